//! What each VM's firewall should hold: its NSG view (user rules, the JIT deny rules
//! of its policy, the JIT allow rules of live grants) and the desired state sent to its
//! agent; and the per-VM change notifications that wake long-polls within
//! milliseconds. Read by the agent API and the VM views alike.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use jitgate_core::Timestamp;
use jitgate_core::ids::VmId;
use jitgate_core::nsg::{GrantRef, NsgRule, nsg_view};
use jitgate_proto::DesiredState;
use tokio::sync::watch;

use crate::AppState;
use crate::error::ApiResult;

/// One watch channel per VM: bumped whenever that VM's desired state may have changed.
/// A channel exists only while a long-poll waits on it: the last [`VmWatch`] to go
/// removes it, so the map holds the VMs being watched now, not every VM ever watched.
#[derive(Default)]
pub struct VmChanges {
    map: Mutex<HashMap<String, watch::Sender<u64>>>,
}

impl VmChanges {
    pub fn subscribe(self: &Arc<Self>, vm: &VmId) -> VmWatch {
        let key = vm.key();
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let rx = map
            .entry(key.clone())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe();
        VmWatch {
            changes: self.clone(),
            key,
            rx: Some(rx),
        }
    }

    pub fn touch<'a>(&self, vms: impl IntoIterator<Item = &'a VmId>) {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        for vm in vms {
            if let Some(tx) = map.get(&vm.key()) {
                tx.send_modify(|r| *r += 1);
            }
        }
    }

    /// Wakes every long-poll (each re-reads its VM's state).
    pub fn touch_all(&self) {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        for tx in map.values() {
            tx.send_modify(|r| *r += 1);
        }
    }

    /// How many VMs are watched now.
    pub fn len(&self) -> usize {
        self.map.lock().map(|m| m.len()).unwrap_or_default()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A long-poll's subscription to one VM's changes; dropping the last one of a VM
/// removes its channel.
pub struct VmWatch {
    changes: Arc<VmChanges>,
    key: String,
    /// Always `Some` until dropped: taken in `drop`, under the map's lock.
    rx: Option<watch::Receiver<u64>>,
}

impl VmWatch {
    /// Marks the current value seen.
    pub fn borrow_and_update(&mut self) {
        if let Some(rx) = &mut self.rx {
            rx.borrow_and_update();
        }
    }

    /// Waits for a change not yet seen.
    pub async fn changed(&mut self) -> Result<(), watch::error::RecvError> {
        match &mut self.rx {
            Some(rx) => rx.changed().await,
            None => std::future::pending().await,
        }
    }
}

impl Drop for VmWatch {
    fn drop(&mut self) {
        // Under the lock, like `subscribe`: a subscriber arriving now either finds the
        // channel still counted or creates a fresh one, never a channel being removed.
        let mut map = self.changes.map.lock().unwrap_or_else(|p| p.into_inner());
        drop(self.rx.take());
        if map
            .get(&self.key)
            .is_some_and(|tx| tx.receiver_count() == 0)
        {
            map.remove(&self.key);
        }
    }
}

/// The VM's NSG view (user, JIT deny and JIT allow rules) and live grants at `now`.
pub async fn nsg_now(
    state: &AppState,
    vm: &VmId,
    now: Timestamp,
) -> ApiResult<(Vec<NsgRule>, Vec<GrantRef>)> {
    let user = state.store.nsg_rules(vm).await?;
    let policy = state.store.vm_policy(vm).await?;
    let mut grants: Vec<GrantRef> = state
        .store
        .live_grants(vm, now)
        .await?
        .into_iter()
        .map(|g| GrantRef {
            request: g.request,
            number: g.number,
            protocol: g.protocol,
            source: g.source,
            start: g.start,
            end: g.end,
        })
        .collect();
    // In order: the agent finds what changed by walking two sorted lists.
    grants.sort_unstable();
    let pvm = policy.as_ref().map(|p| (&p.key, &p.vm));
    Ok((nsg_view(vm, &user, pvm, &grants), grants))
}

/// The VM's desired state now.
pub async fn desired_state(state: &AppState, vm: &VmId) -> ApiResult<DesiredState> {
    let now = state.clock.now();
    let (view, grants) = nsg_now(state, vm, now).await?;
    Ok(jitgate_proto::encode(vm, &view, &grants, now))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use jitgate_core::ids::{ResourceGroup, VmName};
    use std::time::Duration;

    fn vm(name: &str) -> VmId {
        VmId::new(
            jitgate_core::ids::SubscriptionId::new(uuid::Uuid::nil()),
            ResourceGroup::parse("rg").unwrap(),
            VmName::parse(name).unwrap(),
        )
    }

    /// Issue 10: channels of VMs nobody watches any more are removed (the map grew by
    /// one entry per VM ever long-polled).
    #[tokio::test]
    async fn channels_go_with_their_last_watcher() {
        let changes = Arc::new(VmChanges::default());
        let mut a = changes.subscribe(&vm("a"));
        let mut a2 = changes.subscribe(&vm("A"));
        let b = changes.subscribe(&vm("b"));
        assert_eq!(changes.len(), 2, "one channel per VM, by key");

        changes.touch([&vm("a")]);
        a.changed().await.unwrap();
        a2.changed().await.unwrap();
        drop(a);
        assert_eq!(changes.len(), 2, "a is still watched");
        changes.touch([&vm("a")]);
        a2.changed().await.unwrap();
        drop(a2);
        drop(b);
        assert!(changes.is_empty());

        // Touching an unwatched VM creates nothing; a new watcher starts afresh and
        // is woken by the next change.
        changes.touch([&vm("a")]);
        assert!(changes.is_empty());
        let mut again = changes.subscribe(&vm("a"));
        again.borrow_and_update();
        changes.touch([&vm("a")]);
        tokio::time::timeout(Duration::from_secs(1), again.changed())
            .await
            .unwrap()
            .unwrap();
        drop(again);
        assert!(changes.is_empty());
    }
}
