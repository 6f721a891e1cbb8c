//! Gateway mode in SQL: where a VM sits behind a gateway (`placements`) and the
//! mapped ports of VMs in DNAT mode (`mapped_ports`), allocated in the transaction
//! that creates the need (placing the VM, or a policy giving it a port), so a mapped
//! port is never handed out twice on one public address, whatever the number of
//! controllers.

use std::collections::BTreeSet;

use jitgate_core::gateway::{MappedPort, Mode, Placement};

use super::*;

const PLACEMENT_COLS: &str =
    "v.id, p.gateway_id, p.address, p.mode, p.masquerade, p.public_address, p.vm_key";

fn read_placements(
    c: &dyn Db,
    tail: &str,
    params: &[&dyn ToParam],
) -> Result<Vec<(VmId, VmPlacement, String)>> {
    let rows = c.all(
        &format!("SELECT {PLACEMENT_COLS} FROM placements p JOIN vms v ON v.key = p.vm_key {tail}"),
        params,
        |r| {
            Ok((
                r.get::<String>(0)?,
                r.get::<String>(1)?,
                r.get::<String>(2)?,
                r.get::<String>(3)?,
                r.get::<i64>(4)?,
                r.get::<Option<String>>(5)?,
                r.get::<String>(6)?,
            ))
        },
    )?;
    let mut out = Vec::with_capacity(rows.len());
    for (vm, gateway, address, mode, masquerade, public, key) in rows {
        let public = public
            .map(|p| p.parse::<IpAddr>())
            .transpose()
            .map_err(corrupt("public address"))?;
        let mapped = match public {
            Some(p) => read_mapped(c, &key, &p.to_string())?,
            None => Vec::new(),
        };
        out.push((
            VmId::parse(&vm).map_err(corrupt("vm id"))?,
            VmPlacement {
                gateway: VmId::parse(&gateway).map_err(corrupt("gateway id"))?,
                place: Placement {
                    address: address.parse().map_err(corrupt("address"))?,
                    mode: Mode::parse(&mode).map_err(corrupt("mode"))?,
                    masquerade: masquerade != 0,
                    public,
                    mapped,
                },
            },
            key,
        ));
    }
    Ok(out)
}

fn read_mapped(c: &dyn Db, vm_key: &str, public: &str) -> Result<Vec<MappedPort>> {
    let rows = c.all(
        "SELECT number, mapped FROM mapped_ports WHERE vm_key = ?1 AND public_address = ?2 ORDER BY number",
        &[&vm_key, &public],
        |r| Ok((r.get::<i64>(0)?, r.get::<i64>(1)?)),
    )?;
    rows.into_iter()
        .map(|(n, m)| {
            Ok(MappedPort {
                port: Port::new(n).map_err(corrupt("port"))?,
                mapped: Port::new(m).map_err(corrupt("mapped port"))?,
            })
        })
        .collect()
}

/// Gives each port of `vm_key`'s policy a mapped port on its public address when the
/// VM is placed in DNAT mode (the lowest free in [`MAPPED_PORTS`]); ports it already
/// has keep theirs. Called by every write that places a VM or changes its policy.
pub(crate) fn allocate_mapped(
    tx: &dyn Db,
    vm_key: &str,
) -> Result<std::result::Result<(), FieldError>> {
    let place: Option<(String, Option<String>)> = tx.one(
        "SELECT mode, public_address FROM placements WHERE vm_key = ?1",
        &[&vm_key],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let Some(("dnat", Some(public))) = place.as_ref().map(|(m, p)| (m.as_str(), p.clone())) else {
        return Ok(Ok(()));
    };
    let policy: Option<String> = tx.one(
        "SELECT policy_key FROM policy_vms WHERE vm_key = ?1",
        &[&vm_key],
        |r| r.get(0),
    )?;
    let mut wanted: BTreeSet<i64> = BTreeSet::new();
    if let Some(pk) = policy
        && let Some((_, p)) = load_policy(tx, &pk)?
        && let Some(vm) = p.spec.vms.iter().find(|v| v.id.key() == vm_key)
    {
        wanted.extend(vm.ports.iter().map(|r| i64::from(r.number.get())));
    }
    let have: BTreeSet<i64> = tx
        .all(
            "SELECT number FROM mapped_ports WHERE vm_key = ?1 AND public_address = ?2",
            &[&vm_key, &public],
            |r| r.get(0),
        )?
        .into_iter()
        .collect();
    let missing: Vec<i64> = wanted.difference(&have).copied().collect();
    if missing.is_empty() {
        return Ok(Ok(()));
    }
    let used: BTreeSet<i64> = tx
        .all(
            "SELECT mapped FROM mapped_ports WHERE public_address = ?1",
            &[&public],
            |r| r.get(0),
        )?
        .into_iter()
        .collect();
    let (first, last) = MAPPED_PORTS;
    let mut free = (i64::from(first)..=i64::from(last)).filter(|p| !used.contains(p));
    for number in missing {
        let Some(mapped) = free.next() else {
            return Ok(Err(FieldError::new(
                "publicIpAddress",
                format!("no mapped port is left on {public} ({first}-{last} are all in use)"),
            )));
        };
        tx.defer(
            "INSERT INTO mapped_ports(vm_key, number, public_address, mapped) VALUES (?1, ?2, ?3, ?4)",
            &[&vm_key, &number, &public, &mapped],
        )?;
    }
    Ok(Ok(()))
}

pub(crate) fn place(
    ctx: &mut WriteCtx<'_>,
    vm: &VmId,
    gateway: &VmId,
    place: &Placement,
    audit: &AuditCtx,
) -> std::result::Result<VmPlacement, OpError<PlaceError>> {
    let (key, gkey) = (vm.key(), gateway.key());
    let known = |k: &String| ctx.tx.exists("SELECT 1 FROM vms WHERE key = ?1", &[k]);
    if !known(&key)? {
        return Err(OpError::Refused(PlaceError::Unknown(FieldError::new(
            "vm",
            format!("virtual machine '{vm}' is not registered"),
        ))));
    }
    if !known(&gkey)? {
        return Err(OpError::Refused(PlaceError::Unknown(FieldError::new(
            "gateway",
            format!(
                "gateway '{gateway}' is not registered (register it and enroll its agent first)"
            ),
        ))));
    }
    let chain = |m: String| OpError::Refused(PlaceError::Chain(FieldError::new("gateway", m)));
    if key == gkey {
        return Err(chain(format!("'{vm}' cannot be its own gateway")));
    }
    if ctx
        .tx
        .exists("SELECT 1 FROM placements WHERE vm_key = ?1", &[&gkey])?
    {
        return Err(chain(format!(
            "'{gateway}' is itself behind a gateway; a gateway must run its own agent"
        )));
    }
    if ctx
        .tx
        .exists("SELECT 1 FROM placements WHERE gateway_key = ?1", &[&key])?
    {
        return Err(chain(format!(
            "'{vm}' is the gateway of other machines; it cannot move behind one"
        )));
    }
    let address = place.address.to_string();
    let taken: Option<String> = ctx.tx.one(
        "SELECT v.id FROM placements p JOIN vms v ON v.key = p.vm_key WHERE p.gateway_key = ?1 AND p.address = ?2 AND p.vm_key <> ?3",
        &[&gkey, &address, &key],
        |r| r.get(0),
    )?;
    if let Some(other) = taken {
        return Err(OpError::Refused(PlaceError::AddressTaken(FieldError::new(
            "address",
            format!("{address} is already the address of '{other}' behind this gateway"),
        ))));
    }
    let public = place
        .public
        .filter(|_| place.mode == Mode::Dnat)
        .map(|p| p.to_string());
    // Mapped ports stay only on the same public address in DNAT mode.
    match &public {
        Some(p) => ctx.tx.defer(
            "DELETE FROM mapped_ports WHERE vm_key = ?1 AND public_address <> ?2",
            &[&key, p],
        )?,
        None => ctx
            .tx
            .defer("DELETE FROM mapped_ports WHERE vm_key = ?1", &[&key])?,
    }
    ctx.tx
        .defer("DELETE FROM placements WHERE vm_key = ?1", &[&key])?;
    ctx.tx.defer(
        "INSERT INTO placements(vm_key, gateway_key, gateway_id, address, mode, masquerade, public_address)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        &[
            &key,
            &gkey,
            &gateway.to_string(),
            &address,
            &place.mode.as_str(),
            &i64::from(place.masquerade),
            &public,
        ],
    )?;
    if let Err(e) = allocate_mapped(ctx.tx, &key)? {
        return Err(OpError::Refused(PlaceError::NoMappedPort(e)));
    }
    let stored = read_placements(ctx.tx, "WHERE p.vm_key = ?1", &[&key])?
        .into_iter()
        .next()
        .map(|(_, p, _)| p)
        .ok_or_else(|| StoreError::Corrupt("the placement just written is missing".into()))?;
    ctx.audit(
        audit,
        "vm.place",
        &vm.to_string(),
        serde_json::json!({
            "gateway": gateway.to_string(),
            "address": address,
            "mode": place.mode.as_str(),
            "masquerade": place.masquerade,
            "publicIpAddress": public,
            "mappedPorts": stored.place.mapped.iter().map(|m| serde_json::json!({"number": m.port.get(), "mappedPort": m.mapped.get()})).collect::<Vec<_>>(),
        }),
    )?;
    Ok(stored)
}

pub(crate) fn unplace(ctx: &mut WriteCtx<'_>, vm: &VmId, audit: &AuditCtx) -> Result<bool> {
    let key = vm.key();
    let n = ctx
        .tx
        .execute("DELETE FROM placements WHERE vm_key = ?1", &[&key])?;
    ctx.tx
        .defer("DELETE FROM mapped_ports WHERE vm_key = ?1", &[&key])?;
    if n > 0 {
        ctx.audit(audit, "vm.unplace", &vm.to_string(), serde_json::json!({}))?;
    }
    Ok(n > 0)
}

pub(crate) fn one(c: &dyn Db, vm: &VmId) -> Result<Option<VmPlacement>> {
    Ok(read_placements(c, "WHERE p.vm_key = ?1", &[&vm.key()])?
        .into_iter()
        .next()
        .map(|(_, p, _)| p))
}

pub(crate) fn behind(c: &dyn Db, gateway: &VmId) -> Result<Vec<(VmId, VmPlacement)>> {
    Ok(read_placements(
        c,
        "WHERE p.gateway_key = ?1 ORDER BY p.vm_key",
        &[&gateway.key()],
    )?
    .into_iter()
    .map(|(v, p, _)| (v, p))
    .collect())
}

/// The first VM behind `gateway`, if any (a gateway in use cannot be deleted).
pub(crate) fn first_behind(c: &dyn Db, gateway_key: &str) -> Result<Option<VmId>> {
    let id: Option<String> = c.one(
        "SELECT v.id FROM placements p JOIN vms v ON v.key = p.vm_key WHERE p.gateway_key = ?1 ORDER BY p.vm_key LIMIT 1",
        &[&gateway_key],
        |r| r.get(0),
    )?;
    id.map(|i| VmId::parse(&i).map_err(corrupt("vm id")))
        .transpose()
}
