//! Query and path parameters shared by every API module: scopes, counts, paging
//! tokens, times, VM ids from paths, principals. Each refuses bad input with a 400
//! naming the parameter.

use std::collections::HashMap;

use axum::http::StatusCode;
use jitgate_core::Timestamp;
use jitgate_core::ids::{ResourceGroup, Scope, VmId, VmName};

use crate::AppState;
use crate::error::{ApiError, ApiResult};

/// The query string, by name (handlers parse each value themselves to name it in
/// their errors).
pub type Q = HashMap<String, String>;

/// The `scope` field: a subscription, resource group or VM scope of a subscription
/// that exists.
pub fn scope_param(state: &AppState, scope: Option<&str>) -> ApiResult<Scope> {
    let scope = Scope::parse(scope.ok_or_else(|| ApiError::bad_param("scope", "is required"))?)
        .map_err(|e| ApiError::bad_param("scope", e))?;
    if !state.subscriptions.contains(&scope.subscription()) {
        // A well-formed scope of a subscription that is not here: not found, as Azure
        // answers for an unknown subscription.
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "SubscriptionNotFound",
            format!("subscription {} does not exist", scope.subscription()),
        )
        .with_target("scope"));
    }
    Ok(scope)
}

/// A count query parameter from 1 to `max`, `default` when absent.
pub fn count_param(q: &Q, name: &str, default: usize, max: usize) -> ApiResult<usize> {
    match q.get(name) {
        None => Ok(default),
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=max).contains(n))
            .ok_or_else(|| {
                ApiError::bad_param(name, format!("'{l}' is not a number from 1 to {max}"))
            }),
    }
}

/// A `true`/`false` query parameter, false when absent.
pub fn flag_param(q: &Q, name: &str) -> ApiResult<bool> {
    match q.get(name).map(String::as_str) {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(o) => Err(ApiError::bad_param(
            name,
            format!("'{o}' is not true or false"),
        )),
    }
}

/// An RFC 3339 time query parameter.
pub fn time_param(q: &Q, name: &str) -> ApiResult<Option<Timestamp>> {
    q.get(name)
        .map(|s| jitgate_core::request::parse_time(s))
        .transpose()
        .map_err(|e| ApiError::bad_param(name, e))
}

/// The `resourceGroup` query parameter.
pub fn rg_param(q: &Q) -> ApiResult<Option<ResourceGroup>> {
    q.get("resourceGroup")
        .map(|r| ResourceGroup::parse(r))
        .transpose()
        .map_err(|e| ApiError::bad_param("resourceGroup", e))
}

/// The opaque continuation token of a page that ended at the item with key `key`.
pub fn continuation(key: &str) -> String {
    hex::encode(key)
}

/// The key the previous page ended at, from `continuationToken`.
pub fn after_continuation(q: &Q) -> ApiResult<Option<String>> {
    q.get("continuationToken")
        .map(|t| {
            hex::decode(t)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| {
                    ApiError::bad_param(
                        "continuationToken",
                        "is not a token this API returned (pass it back unchanged)",
                    )
                })
        })
        .transpose()
}

/// The page key of an item of a list ordered by time and id (`Cursor`), as
/// `continuation` encodes it.
pub fn cursor_key(at: Timestamp, id: &str) -> String {
    format!("{}/{id}", at.as_nanosecond())
}

/// The store's cursor from a page key made by `cursor_key` (and handed back by the
/// client inside a continuation token: checked, never trusted).
pub fn cursor(key: &str) -> ApiResult<jitgate_store::Cursor> {
    let bad = || {
        ApiError::bad_param(
            "continuationToken",
            "is not a token this API returned (pass it back unchanged)",
        )
    };
    let (ns, id) = key.split_once('/').ok_or_else(bad)?;
    let at = ns
        .parse::<i128>()
        .ok()
        .and_then(|n| Timestamp::from_nanosecond(n).ok())
        .ok_or_else(bad)?;
    Ok(jitgate_store::Cursor {
        at,
        id: id.to_owned(),
    })
}

/// The VM of the path's resource group and name, in the default subscription.
pub fn vm_param(state: &AppState, rg: &str, name: &str) -> ApiResult<VmId> {
    Ok(VmId::new(
        state.default_subscription(),
        ResourceGroup::parse(rg).map_err(|e| ApiError::bad_param("resourceGroup", e))?,
        VmName::parse(name).map_err(|e| ApiError::bad_param("name", e))?,
    ))
}

/// A principal's name: 1 to 256 characters, no spaces or control characters.
pub fn check_principal(field: &str, s: &str) -> ApiResult<()> {
    if s.is_empty() || s.len() > 256 || s.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(ApiError::bad_param(
            field,
            "must be 1 to 256 characters with no spaces or control characters",
        ));
    }
    Ok(())
}

/// The subscription scope of the default subscription.
pub fn sub_scope(state: &AppState) -> Scope {
    Scope::Subscription(state.default_subscription())
}

/// A page of `items` (which holds at most `limit + 1`: the one past the page says that
/// more follow), with the continuation token at the page's last item's key.
pub fn page<T>(
    mut items: Vec<T>,
    limit: usize,
    key: impl Fn(&T) -> String,
) -> (Vec<T>, Option<String>) {
    if items.len() > limit {
        items.truncate(limit);
        let next = items.last().map(|t| continuation(&key(t)));
        (items, next)
    } else {
        (items, None)
    }
}

/// Fills a page of `limit` items the caller may see from `fetch(after, n)` (items in
/// key order after `after`, at most `n`), skipping what `visible` refuses, however many
/// refused items lie between visible ones. Returns the page and its continuation token.
pub async fn filtered_page<T, F, Fut>(
    mut after: Option<String>,
    limit: usize,
    key: impl Fn(&T) -> String,
    visible: impl Fn(&T) -> bool,
    mut fetch: F,
) -> ApiResult<(Vec<T>, Option<String>)>
where
    F: FnMut(Option<String>, usize) -> Fut,
    Fut: std::future::Future<Output = ApiResult<Vec<T>>>,
{
    let batch_size = (limit + 1).max(100);
    let mut out: Vec<T> = Vec::with_capacity(limit + 1);
    loop {
        let batch = fetch(after.clone(), batch_size).await?;
        let exhausted = batch.len() < batch_size;
        for item in batch {
            after = Some(key(&item));
            if visible(&item) {
                out.push(item);
                if out.len() > limit {
                    return Ok(page(out, limit, key));
                }
            }
        }
        if exhausted {
            return Ok((out, None));
        }
    }
}

/// A page of a list ordered by creation (`Cursor`: time, then id), read from the store
/// with `fetch` and filtered by `visible` as `filtered_page` does. Checks the
/// continuation token before any read.
pub async fn cursor_page<T, F, Fut>(
    q: &Q,
    limit: usize,
    key: impl Fn(&T) -> (Timestamp, &str),
    visible: impl Fn(&T) -> bool,
    fetch: F,
) -> ApiResult<(Vec<T>, Option<String>)>
where
    F: Fn(jitgate_store::Paging) -> Fut,
    Fut: std::future::Future<Output = Result<Vec<T>, jitgate_store::StoreError>>,
{
    let after = after_continuation(q)?;
    if let Some(a) = &after {
        cursor(a)?;
    }
    filtered_page(
        after,
        limit,
        |t| {
            let (at, id) = key(t);
            cursor_key(at, id)
        },
        visible,
        |after, n| {
            let after = after.as_deref().map(cursor).transpose();
            let fetch = &fetch;
            async move {
                let paging = jitgate_store::Paging {
                    after: after?,
                    limit: n,
                };
                Ok(fetch(paging).await?)
            }
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn q(pairs: &[(&str, &str)]) -> Q {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn counts_are_bounded_and_named() {
        assert_eq!(count_param(&q(&[]), "limit", 100, 1000).unwrap(), 100);
        assert_eq!(
            count_param(&q(&[("limit", "7")]), "limit", 100, 1000).unwrap(),
            7
        );
        for bad in ["0", "1001", "-1", "x", ""] {
            let e = count_param(&q(&[("limit", bad)]), "limit", 100, 1000).unwrap_err();
            assert_eq!(e.target.as_deref(), Some("limit"), "{bad}");
        }
    }

    #[test]
    fn continuation_tokens_round_trip_and_refuse_forgeries() {
        let t = continuation("sub/rg/vm-1");
        assert_eq!(
            after_continuation(&q(&[("continuationToken", &t)]))
                .unwrap()
                .as_deref(),
            Some("sub/rg/vm-1")
        );
        for bad in ["zz", "ff", "abc"] {
            let e = after_continuation(&q(&[("continuationToken", bad)])).unwrap_err();
            assert_eq!(e.target.as_deref(), Some("continuationToken"));
        }
    }

    #[test]
    fn flags_accept_only_true_and_false() {
        assert!(flag_param(&q(&[("mine", "true")]), "mine").unwrap());
        assert!(!flag_param(&q(&[]), "mine").unwrap());
        assert_eq!(
            flag_param(&q(&[("mine", "yes")]), "mine")
                .unwrap_err()
                .target
                .as_deref(),
            Some("mine")
        );
    }

    #[test]
    fn cursors_round_trip_and_refuse_garbage() {
        let at = Timestamp::from_second(1_800_000_000).unwrap();
        let c = cursor(&cursor_key(at, "abc/def")).unwrap();
        assert_eq!((c.at, c.id.as_str()), (at, "abc/def"));
        for bad in ["", "x/abc", "12", "99999999999999999999999999999/x"] {
            assert_eq!(
                cursor(bad).unwrap_err().target.as_deref(),
                Some("continuationToken"),
                "{bad}"
            );
        }
    }

    #[tokio::test]
    async fn filtered_pages_stay_full_across_hidden_items() {
        // 1..=1000, only multiples of 7 visible: pages of 10 stay full to the end.
        let all: Vec<u32> = (1..=1000).collect();
        let fetch = |after: Option<String>, n: usize| {
            let start = after.map(|a| a.parse::<u32>().unwrap()).unwrap_or(0);
            let items: Vec<u32> = all.iter().copied().filter(|x| *x > start).take(n).collect();
            async move { Ok(items) }
        };
        let key = |x: &u32| format!("{x:010}");
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let (items, next) = filtered_page(
                after.clone(),
                10,
                key,
                |x| x % 7 == 0,
                |a: Option<String>, n| fetch(a, n),
            )
            .await
            .unwrap();
            if next.is_some() {
                assert_eq!(items.len(), 10);
            }
            seen.extend(items);
            match next {
                Some(t) => after = after_continuation(&q(&[("continuationToken", &t)])).unwrap(),
                None => break,
            }
        }
        let want: Vec<u32> = (1..=1000).filter(|x| x % 7 == 0).collect();
        assert_eq!(seen, want);
    }
}
