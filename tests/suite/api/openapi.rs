//! The OpenAPI document against the live API: every route it can answer is documented with
//! the statuses it really returns, and every documented route answers with a documented status.

use std::collections::BTreeSet;

use super::{api_config, call, call_as, call_from, token_less_config, TOKEN};
use crate::common::*;
use ferry::ServiceConfig;
use serde_json::Value;

/// What each route can answer: 403 on all (a foreign Host without a token, or a ban), the
/// token's 401 on all but the first two.
const ROUTES: [(&str, &str, &[u16]); 12] = [
    ("get", "/", &[200, 403]),
    ("get", "/openapi.json", &[200, 403]),
    ("get", "/status", &[200, 401, 403]),
    ("get", "/health", &[200, 401, 403]),
    ("get", "/cluster", &[200, 401, 403]),
    ("get", "/clients", &[200, 400, 401, 403]),
    ("delete", "/clients/{cid}", &[200, 400, 401, 403, 404]),
    ("get", "/services", &[200, 400, 401, 403]),
    ("delete", "/services/{id}", &[200, 400, 401, 403, 404]),
    ("get", "/ports/free", &[200, 400, 401, 403]),
    ("get", "/ping", &[200, 400, 401, 403, 404, 504]),
    ("get", "/metrics", &[200, 401, 403, 500]),
];

/// The statuses the document gives for `method path`.
fn documented(document: &Value, method: &str, path: &str) -> BTreeSet<u16> {
    let responses = document["paths"][path][method]["responses"].as_object();
    let responses = responses.unwrap_or_else(|| panic!("{method} {path} is not documented"));
    responses.keys().map(|status| status.parse().expect("a numeric status")).collect()
}

/// The operation's parameters, with `$ref`s resolved.
fn parameters<'a>(document: &'a Value, operation: &'a Value) -> Vec<&'a Value> {
    let listed = operation["parameters"].as_array().map(Vec::as_slice).unwrap_or_default();
    listed
        .iter()
        .map(|p| match p["$ref"].as_str() {
            Some(reference) => document.pointer(reference.trim_start_matches('#')).expect("a known $ref"),
            None => p,
        })
        .collect()
}

/// A request of `operation` with valid parameters, and one with a bad integer where it has one.
fn probes(document: &Value, path: &str, operation: &Value, cid: u64) -> (String, Option<String>) {
    let mut good = path.replace("{cid}", "999999").replace("{id}", "999999");
    let mut bad = path.contains('{').then(|| path.replace("{cid}", "x").replace("{id}", "x"));
    for parameter in parameters(document, operation) {
        let name = parameter["name"].as_str().expect("a named parameter");
        if parameter["in"] == "query" && parameter["schema"]["type"] == "integer" {
            bad.get_or_insert_with(|| format!("{path}?{name}=not-a-number"));
            if parameter["required"] == true {
                good = format!("{good}?{name}={cid}");
            }
        }
    }
    (good, bad)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_describes_what_the_live_api_answers() {
    within(60, async {
        let mut config = api_config();
        config.reconnect_times = 2;
        let server = start_server(config).await;
        let api = server.api_local_addr().unwrap();
        let client = connect(server.local_addr()).await;
        let _tunnel = client.add_service(ServiceConfig::tcp(&echo_server().await.to_string())).await.unwrap();
        let (status, document) = call(api, "GET", "/openapi.json", None).await;
        assert_eq!(status, 200, "the document needs no token");
        let cid = super::get(api, "/clients").await[0]["cid"].as_u64().unwrap();

        // Every route the router serves, with every status it can return.
        for (method, path, statuses) in ROUTES {
            let documented = documented(&document, method, path);
            for status in statuses {
                assert!(documented.contains(status), "{method} {path}: {status} is not documented");
            }
        }
        let served: BTreeSet<_> = ROUTES.iter().map(|(m, p, _)| format!("{m} {p}")).collect();
        let paths = document["paths"].as_object().unwrap();
        let listed = paths
            .iter()
            .flat_map(|(p, ops)| ops.as_object().unwrap().keys().map(move |m| format!("{m} {p}")));
        assert_eq!(listed.collect::<BTreeSet<_>>(), served, "the document lists other routes");

        // Ban one address with bad tokens; the others stay welcome.
        let banned = "127.0.0.61";
        for guess in ["guess-1", "guess-2"] {
            assert_eq!(call_from(banned, api, "GET", "/status", Some(guess)).await.0, 401);
        }

        // Walk the live API: each documented route, each way it can be asked.
        for (path, operations) in paths {
            for (method, operation) in operations.as_object().unwrap() {
                let allowed = documented(&document, method, path);
                let guarded = operation["security"] != serde_json::json!([]);
                let verb = method.to_ascii_uppercase();
                let (good, bad) = probes(&document, path, operation, cid);
                let mut answers = vec![(good.clone(), call(api, &verb, &good, Some(TOKEN)).await.0)];
                let expected = if verb == "DELETE" { 404 } else { 200 };
                assert_eq!(answers[0].1, expected, "{verb} {good}");
                if let Some(bad) = bad {
                    let status = call(api, &verb, &bad, Some(TOKEN)).await.0;
                    assert_eq!(status, 400, "{verb} {bad}");
                    answers.push((bad, status));
                }
                if guarded {
                    let status = call(api, &verb, &good, None).await.0;
                    assert_eq!(status, 401, "{verb} {good} without the token");
                    answers.push((format!("{good} without the token"), status));
                    let status = call_from(banned, api, &verb, &good, Some(TOKEN)).await.0;
                    assert_eq!(status, 403, "{verb} {good} from a banned address");
                    answers.push((format!("{good} from a banned address"), status));
                }
                for (asked, status) in answers {
                    assert!(allowed.contains(&status), "{verb} {asked}: {status} is not documented");
                }
            }
        }
        server.shutdown().await;
    })
    .await
}

/// Found by schemathesis (tests/api_schema.sh): a token-less server served a document that
/// asked for the bearer token and left out the 403 it gives a foreign Host on every route.
/// Now its document asks for no token, and every route's 403 is documented.
#[tokio::test]
async fn a_token_less_server_documents_what_it_answers() {
    within(30, async {
        let server = start_server(token_less_config()).await;
        let api = server.api_local_addr().unwrap();
        let (status, document) = call(api, "GET", "/openapi.json", None).await;
        assert_eq!(status, 200);
        assert_eq!(document["security"], serde_json::json!([]), "no token is needed here");
        for (method, path, _) in ROUTES {
            let verb = method.to_ascii_uppercase();
            let probe = path.replace("{cid}", "999999").replace("{id}", "999999");
            let (status, body) = call_as("127.0.0.1", "attacker.example", api, &verb, &probe, None).await;
            assert_eq!(status, 403, "{verb} {probe} for a foreign host: {body}");
            assert!(documented(&document, method, path).contains(&403), "{verb} {path}: 403 undocumented");
            let (status, body) = call(api, &verb, &probe, None).await;
            assert_ne!(status, 401, "{verb} {probe} needs no token here: {body}");
            assert!(documented(&document, method, path).contains(&status), "{verb} {probe}: {status}");
        }
        // With a token, the document served is the one that asks for it.
        server.shutdown().await;
        let server = start_server(api_config()).await;
        let (_, document) = call(server.api_local_addr().unwrap(), "GET", "/openapi.json", None).await;
        assert_eq!(document["security"], serde_json::json!([{ "bearer": [] }]));
        server.shutdown().await;
    })
    .await
}

/// Found by schemathesis: integers the document allowed were refused (a negative `cid`,
/// which the document did not rule out; a `limit` above its stated maximum was clamped
/// instead of refused). Now the document gives each integer's real range, and every
/// value in it is accepted.
#[tokio::test]
async fn integer_parameters_accept_their_whole_documented_range() {
    within(30, async {
        let server = start_server(api_config()).await;
        let api = server.api_local_addr().unwrap();
        let (_, document) = call(api, "GET", "/openapi.json", None).await;
        let u64_range = serde_json::json!([0, u64::MAX]);
        let range = |schema: &Value| serde_json::json!([schema["minimum"], schema["maximum"]]);
        assert_eq!(range(&document["components"]["parameters"]["cid"]["schema"]), u64_range);
        let limit = &document["paths"]["/ports/free"]["get"]["parameters"][0]["schema"];
        assert_eq!(range(limit), u64_range);
        let service = &document["paths"]["/services/{id}"]["delete"]["parameters"][0]["schema"];
        assert_eq!(range(service), serde_json::json!([0, u32::MAX]));

        let most = format!("/ports/free?limit={}", u64::MAX);
        let (status, body) = call(api, "GET", &most, Some(TOKEN)).await;
        assert_eq!(status, 200, "{body}");
        assert!(body["free"].as_array().unwrap().len() <= 100, "clamped");
        for path in [format!("/clients?cid={}", u64::MAX), format!("/services?cid={}", u64::MAX)] {
            assert_eq!(call(api, "GET", &path, Some(TOKEN)).await, (200, serde_json::json!([])), "{path}");
        }
        for path in [format!("/clients/{}", u64::MAX), format!("/services/{}", u32::MAX)] {
            assert_eq!(call(api, "DELETE", &path, Some(TOKEN)).await.0, 404, "{path}");
        }
        for path in ["/clients?cid=-1", "/ports/free?limit=-1", "/services/4294967296"] {
            let verb = if path.starts_with("/services/") { "DELETE" } else { "GET" };
            assert_eq!(call(api, verb, path, Some(TOKEN)).await.0, 400, "{path} is out of range");
        }
        server.shutdown().await;
    })
    .await
}
