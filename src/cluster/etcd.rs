//! A small etcd v3 client over etcd's JSON gateway (`/v3/...` on the client port, served by
//! every etcd since 3.3): leases, create-if-absent, reads by prefix, deletes and watches.
//! It rides on the crate's HTTP client ([`JsonApi`]) rather than gRPC: the etcd-client
//! crate brings tonic, prost and a protobuf compiler, about 25 crates, and was measured to
//! add over three minutes to CI's builds.
//!
//! etcd's JSON writes keys and values in base64 and 64-bit numbers as strings.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use bytes::{Buf, BytesMut};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde::{Deserialize, Deserializer};
use serde_json::{json, Value};
use std::time::Duration;

use crate::transport::JsonApi;

/// Largest answer read for one call (a range over every route of a big cluster fits).
const MAX_ANSWER: usize = 64 << 20;

/// Largest single event batch of a watch.
const MAX_WATCH_MESSAGE: usize = 16 << 20;

/// An etcd cluster's client port.
#[derive(Clone)]
pub(crate) struct Etcd {
    api: JsonApi,
}

/// A key and its value, with the revision that created it and the lease it lives under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) key: String,
    pub(crate) value: Vec<u8>,
    pub(crate) create_revision: i64,
    pub(crate) lease: i64,
}

/// One change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Change {
    /// The key was written.
    Put(Entry),
    /// The key was deleted (or its lease expired).
    Delete(String),
}

impl Etcd {
    /// The etcd at `url` (`http://127.0.0.1:2379`: http only on loopback, as every JSON
    /// API of ferry); each call ends within `timeout`.
    pub(crate) fn new(url: &str, timeout: Duration) -> Result<Self, String> {
        Ok(Etcd { api: JsonApi::new(url, timeout)? })
    }

    async fn call(&self, path: &str, body: Value) -> Result<Value, String> {
        let (status, answer) =
            self.api.at(path)?.call(Some(body.to_string().into_bytes()), MAX_ANSWER).await?;
        let answer: Value =
            serde_json::from_slice(&answer).map_err(|e| format!("etcd answered {path} with no JSON: {e}"))?;
        if status != 200 {
            let why = answer.get("message").or_else(|| answer.get("error")).and_then(Value::as_str);
            return Err(format!("etcd refused {path} ({status}): {}", why.unwrap_or("no reason given")));
        }
        Ok(answer)
    }

    /// A new lease that lives `ttl` unless kept alive; its number.
    pub(crate) async fn grant(&self, ttl: Duration) -> Result<i64, String> {
        let answer = self.call("/v3/lease/grant", json!({ "TTL": ttl.as_secs().max(1) })).await?;
        number(&answer["ID"]).ok_or_else(|| "etcd granted a lease without a number".to_owned())
    }

    /// Renews lease `lease`; false when it has expired (its keys are gone).
    pub(crate) async fn keep_alive(&self, lease: i64) -> Result<bool, String> {
        let answer = self.call("/v3/lease/keepalive", json!({ "ID": lease.to_string() })).await?;
        Ok(number(&answer["result"]["TTL"]).is_some_and(|ttl| ttl > 0))
    }

    /// Ends lease `lease` now, and its keys with it.
    pub(crate) async fn revoke(&self, lease: i64) -> Result<(), String> {
        self.call("/v3/lease/revoke", json!({ "ID": lease.to_string() })).await.map(drop)
    }

    /// One transaction: the `success` requests if every compare holds; the revision they
    /// were written at, `None` when a compare failed.
    async fn txn(&self, compare: Vec<Value>, success: Vec<Value>) -> Result<Option<i64>, String> {
        let answer = self.call("/v3/kv/txn", json!({ "compare": compare, "success": success })).await?;
        if !answer["succeeded"].as_bool().unwrap_or(false) {
            return Ok(None);
        }
        number(&answer["header"]["revision"])
            .map(Some)
            .ok_or_else(|| "etcd's txn answer has no revision".into())
    }

    fn put(key: &str, value: &[u8], lease: i64) -> Value {
        json!({ "request_put": { "key": BASE64.encode(key), "value": BASE64.encode(value), "lease": lease.to_string() } })
    }

    /// Writes `key` only if it does not exist, under `lease` (0: none); the revision it was
    /// written at, `None` when it exists.
    pub(crate) async fn create(&self, key: &str, value: &[u8], lease: i64) -> Result<Option<i64>, String> {
        let absent = json!({ "key": BASE64.encode(key), "target": "CREATE", "result": "EQUAL", "create_revision": "0" });
        self.txn(vec![absent], vec![Self::put(key, value, lease)]).await
    }

    /// Writes `key` under `lease` only if no key lies in any of the ranges `[start, end)` of
    /// `empty` (one transaction: two writers can never both succeed); the revision it was
    /// written at, `None` otherwise.
    pub(crate) async fn put_if_empty(
        &self,
        (key, value): (&str, &[u8]),
        lease: i64,
        empty: &[(String, Vec<u8>)],
    ) -> Result<Option<i64>, String> {
        // A range compare holds when every key in the range matches: here, none exists.
        let compare: Vec<Value> = empty
            .iter()
            .map(|(start, end)| {
                json!({ "key": BASE64.encode(start), "range_end": BASE64.encode(end),
                        "target": "CREATE", "result": "EQUAL", "create_revision": "0" })
            })
            .collect();
        self.txn(compare, vec![Self::put(key, value, lease)]).await
    }

    /// Writes `key` under `lease` only if its value is `old` now; the revision it was
    /// written at, `None` otherwise.
    pub(crate) async fn replace(
        &self,
        key: &str,
        (old, new): (&[u8], &[u8]),
        lease: i64,
    ) -> Result<Option<i64>, String> {
        let same = json!({ "key": BASE64.encode(key), "target": "VALUE", "result": "EQUAL", "value": BASE64.encode(old) });
        self.txn(vec![same], vec![Self::put(key, new, lease)]).await
    }

    /// Deletes `key` only if it was last written at `revision` (so a write made since, by
    /// this node or another, stays); false otherwise.
    pub(crate) async fn delete_if(&self, key: &str, revision: i64) -> Result<bool, String> {
        let key = BASE64.encode(key);
        let unchanged =
            json!({ "key": key, "target": "MOD", "result": "EQUAL", "mod_revision": revision.to_string() });
        let delete = json!({ "request_delete_range": { "key": key } });
        Ok(self.txn(vec![unchanged], vec![delete]).await?.is_some())
    }

    /// Every key starting with `prefix`, and the store's revision they were read at (a
    /// watch from the next revision misses nothing).
    pub(crate) async fn prefix(&self, prefix: &str) -> Result<(i64, Vec<Entry>), String> {
        let request = json!({ "key": BASE64.encode(prefix), "range_end": BASE64.encode(prefix_end(prefix)) });
        let answer: RangeAnswer = serde_json::from_value(self.call("/v3/kv/range", request).await?)
            .map_err(|e| format!("etcd's range answer: {e}"))?;
        let entries = answer.kvs.into_iter().map(Entry::try_from).collect::<Result<_, _>>()?;
        Ok((answer.header.revision, entries))
    }

    /// Watches every key starting with `prefix` from revision `from` on.
    pub(crate) async fn watch(&self, prefix: &str, from: i64) -> Result<Watch, String> {
        let request = json!({ "create_request": {
            "key": BASE64.encode(prefix),
            "range_end": BASE64.encode(prefix_end(prefix)),
            "start_revision": from.to_string(),
        }});
        let (status, body) = self.api.at("/v3/watch")?.stream(Some(request.to_string().into_bytes())).await?;
        if status != 200 {
            return Err(format!("etcd refused the watch ({status})"));
        }
        Ok(Watch { body, buffered: BytesMut::new() })
    }
}

/// The changes under a prefix, as etcd sends them.
pub(crate) struct Watch {
    body: Incoming,
    buffered: BytesMut,
}

impl Watch {
    /// The next batch of changes, with the revision of the last; `Ok(None)` when etcd
    /// ended the watch (the caller reads again and watches from there).
    pub(crate) async fn next(&mut self) -> Result<Option<(i64, Vec<Change>)>, String> {
        loop {
            if let Some(message) = self.take_message()? {
                let message: WatchMessage =
                    serde_json::from_value(message).map_err(|e| format!("etcd's watch message: {e}"))?;
                let Some(result) = message.result else { continue };
                if result.canceled {
                    return Ok(None);
                }
                if result.events.is_empty() {
                    continue; // the watch's creation, or progress
                }
                let changes = result.events.into_iter().map(Change::try_from).collect::<Result<_, _>>()?;
                return Ok(Some((result.header.revision, changes)));
            }
            match self.body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        if self.buffered.len().saturating_add(data.len()) > MAX_WATCH_MESSAGE {
                            return Err("etcd's watch message is too large".into());
                        }
                        self.buffered.extend_from_slice(&data);
                    }
                }
                Some(Err(err)) => return Err(format!("etcd's watch broke: {err}")),
                None => return Ok(None),
            }
        }
    }

    /// The first whole JSON value buffered, if one is.
    fn take_message(&mut self) -> Result<Option<Value>, String> {
        let mut values = serde_json::Deserializer::from_slice(&self.buffered).into_iter::<Value>();
        match values.next() {
            Some(Ok(value)) => {
                let used = values.byte_offset();
                self.buffered.advance(used);
                Ok(Some(value))
            }
            Some(Err(err)) if err.is_eof() => Ok(None),
            Some(Err(err)) => Err(format!("etcd's watch sent broken JSON: {err}")),
            None => Ok(None),
        }
    }
}

/// The first key past every key starting with `prefix` (etcd's `range_end`).
pub(crate) fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0] // every key
}

/// A 64-bit number as etcd's JSON writes it (a string), or as a number.
fn number(value: &Value) -> Option<i64> {
    match value {
        Value::String(text) => text.parse().ok(),
        Value::Number(n) => n.as_i64(),
        _ => None,
    }
}

fn string_number<'de, D: Deserializer<'de>>(deserializer: D) -> Result<i64, D::Error> {
    let value = Value::deserialize(deserializer)?;
    Ok(number(&value).unwrap_or(0))
}

#[derive(Deserialize)]
struct Header {
    #[serde(default, deserialize_with = "string_number")]
    revision: i64,
}

#[derive(Deserialize)]
struct RangeAnswer {
    header: Header,
    #[serde(default)]
    kvs: Vec<KeyValue>,
}

#[derive(Deserialize)]
struct KeyValue {
    key: String,
    #[serde(default)]
    value: String,
    #[serde(default, deserialize_with = "string_number")]
    create_revision: i64,
    #[serde(default, deserialize_with = "string_number")]
    lease: i64,
}

impl TryFrom<KeyValue> for Entry {
    type Error = String;

    fn try_from(kv: KeyValue) -> Result<Self, String> {
        let key = BASE64.decode(kv.key).map_err(|e| format!("etcd sent a key not in base64: {e}"))?;
        let key = String::from_utf8(key).map_err(|_| "etcd sent a key not in UTF-8".to_owned())?;
        let value = BASE64.decode(kv.value).map_err(|e| format!("etcd sent a value not in base64: {e}"))?;
        Ok(Entry { key, value, create_revision: kv.create_revision, lease: kv.lease })
    }
}

#[derive(Deserialize)]
struct WatchMessage {
    result: Option<WatchResult>,
}

#[derive(Deserialize)]
struct WatchResult {
    header: Header,
    #[serde(default)]
    canceled: bool,
    #[serde(default)]
    events: Vec<Event>,
}

#[derive(Deserialize)]
struct Event {
    /// Absent for a put (the default of etcd's enum), "DELETE" for a delete.
    #[serde(default, rename = "type")]
    kind: Option<String>,
    kv: KeyValue,
}

impl TryFrom<Event> for Change {
    type Error = String;

    fn try_from(event: Event) -> Result<Self, String> {
        let entry = Entry::try_from(event.kv)?;
        Ok(match event.kind.as_deref() {
            Some("DELETE") => Change::Delete(entry.key),
            _ => Change::Put(entry),
        })
    }
}

// The test suite's etcd harness, shared.
#[cfg(test)]
#[path = "../../tests/suite/common/etcd.rs"]
#[allow(dead_code)]
mod etcd_process;

#[cfg(test)]
mod tests {
    use super::*;

    use super::etcd_process::EtcdProcess;

    #[tokio::test]
    async fn a_key_is_created_once_and_lives_with_its_lease() {
        let etcd = EtcdProcess::start().await;
        let client = Etcd::new(&etcd.url, Duration::from_secs(5)).unwrap();
        let lease = client.grant(Duration::from_secs(2)).await.unwrap();
        assert!(client.create("/ferry/ports/9000", b"n1", lease).await.unwrap().is_some(), "the first wins");
        assert!(client.create("/ferry/ports/9000", b"n2", 0).await.unwrap().is_none(), "the second loses");
        assert!(client.create("/ferry/ports/9001", b"n2", 0).await.unwrap().is_some());
        let (revision, entries) = client.prefix("/ferry/ports/").await.unwrap();
        assert!(revision > 0);
        let owners: Vec<_> = entries.iter().map(|e| (e.key.as_str(), e.value.as_slice(), e.lease)).collect();
        assert_eq!(owners, [("/ferry/ports/9000", &b"n1"[..], lease), ("/ferry/ports/9001", &b"n2"[..], 0)]);
        assert!(client.keep_alive(lease).await.unwrap(), "a live lease is renewed");

        // Left to expire, the lease takes its key along; the other key stays.
        let mut gone = false;
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let (_, entries) = client.prefix("/ferry/ports/").await.unwrap();
            if entries.len() == 1 {
                gone = true;
                break;
            }
        }
        assert!(gone, "the key under the expired lease is gone");
        assert!(!client.keep_alive(lease).await.unwrap(), "an expired lease is not renewed");
        let written = client.create("/ferry/ports/9000", b"n2", 0).await.unwrap().expect("free again");
        assert!(!client.delete_if("/ferry/ports/9000", written - 1).await.unwrap(), "written since");
        assert!(client.delete_if("/ferry/ports/9000", written).await.unwrap());
        assert!(!client.delete_if("/ferry/ports/9000", written).await.unwrap(), "gone already");
        assert!(client.grant(Duration::from_secs(5)).await.is_ok());
        let revoked = client.grant(Duration::from_secs(60)).await.unwrap();
        client.revoke(revoked).await.unwrap();
        assert!(!client.keep_alive(revoked).await.unwrap(), "a revoked lease is gone");
    }

    #[tokio::test]
    async fn a_put_if_empty_is_refused_while_a_key_lies_in_a_range() {
        let etcd = EtcdProcess::start().await;
        let client = Etcd::new(&etcd.url, Duration::from_secs(5)).unwrap();
        let range = |from: &str, to: &str| (from.to_owned(), to.as_bytes().to_vec());
        let empty = [range("/c/a/", "/c/a0")];
        assert!(
            client.put_if_empty(("/c/b/1", b"x"), 0, &empty).await.unwrap().is_some(),
            "nothing in the way"
        );
        assert!(
            client.put_if_empty(("/c/a/1", b"x"), 0, &empty).await.unwrap().is_some(),
            "still nothing there"
        );
        assert!(client.put_if_empty(("/c/b/2", b"x"), 0, &empty).await.unwrap().is_none(), "now /c/a/1 is");
        let (_, entries) = client.prefix("/c/").await.unwrap();
        assert_eq!(entries.len(), 2, "the refused write wrote nothing");
    }

    #[tokio::test]
    async fn a_watch_from_a_read_revision_misses_nothing() {
        let etcd = EtcdProcess::start().await;
        let client = Etcd::new(&etcd.url, Duration::from_secs(5)).unwrap();
        assert!(client.create("/ferry/hosts/a", b"n1", 0).await.unwrap().is_some());
        let (revision, entries) = client.prefix("/ferry/hosts/").await.unwrap();
        assert_eq!(entries.len(), 1);
        // Written between the read and the watch: the watch from the read's revision sees it.
        assert!(client.create("/ferry/hosts/b", b"n2", 0).await.unwrap().is_some());
        assert!(client.create("/ferry/other", b"x", 0).await.unwrap().is_some());
        let mut watch = client.watch("/ferry/hosts/", revision + 1).await.unwrap();
        assert!(client.delete_if("/ferry/hosts/a", revision).await.unwrap());
        let mut seen = Vec::new();
        while seen.len() < 2 {
            let (_, changes) = tokio::time::timeout(Duration::from_secs(10), watch.next())
                .await
                .expect("the watch delivers")
                .unwrap()
                .expect("the watch goes on");
            seen.extend(changes);
        }
        match &seen[..] {
            [Change::Put(put), Change::Delete(deleted)] => {
                assert_eq!((put.key.as_str(), put.value.as_slice()), ("/ferry/hosts/b", &b"n2"[..]));
                assert_eq!(deleted, "/ferry/hosts/a");
            }
            other => panic!("unexpected changes: {other:?}"),
        }
    }

    #[test]
    fn prefix_ends_are_the_next_key_past_the_prefix() {
        assert_eq!(prefix_end("/ferry/"), b"/ferry0");
        assert_eq!(prefix_end(""), vec![0]);
        assert_eq!(number(&json!("42")), Some(42));
        assert_eq!(number(&json!(7)), Some(7));
        assert_eq!(number(&json!("x")), None);
    }
}
