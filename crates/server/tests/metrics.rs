//! The metrics endpoint and request ids, against a real server: counters and histograms move
//! with real API requests, scraped over HTTP; every response carries a request id.

mod support;

use isthmus_server::metrics::{listen, Registry, ServerMetrics};
use reqwest::{Method, StatusCode};
use serde_json::json;
use std::sync::Arc;
use support::{issue_token, send, test_config, ADMIN_PASSWORD, ADMIN_PROJECT, ADMIN_USER};

struct Running {
    handle: isthmus_server::ServerHandle,
    metrics: isthmus_server::metrics::MetricsHandle,
    network: String,
    identity: String,
    token: String,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

async fn start() -> Running {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = isthmus_store::embedded::EmbeddedStore::open(dir.path()).expect("store");
    let mut registry = Registry::default();
    let m = ServerMetrics::new(&mut registry);
    let handle = isthmus_server::start_with_metrics(test_config(), store, m)
        .await
        .expect("server starts");
    let metrics = listen("127.0.0.1:0".parse().expect("addr"), Arc::new(registry))
        .await
        .expect("metrics listener");
    let http = reqwest::Client::new();
    let identity = format!("http://{}/v3", handle.identity_addr);
    let token = issue_token(&http, &identity, ADMIN_USER, ADMIN_PASSWORD, ADMIN_PROJECT).await;
    Running {
        network: format!("http://{}", handle.network_addr),
        identity,
        token,
        http,
        metrics,
        handle,
        _dir: dir,
    }
}

impl Running {
    async fn scrape(&self) -> String {
        let resp = self
            .http
            .get(format!("http://{}/metrics", self.metrics.addr))
            .send()
            .await
            .expect("scrape");
        assert_eq!(resp.status(), StatusCode::OK);
        let ct = resp.headers()["content-type"]
            .to_str()
            .expect("content type")
            .to_string();
        assert!(ct.starts_with("application/openmetrics-text"), "{ct}");
        resp.text().await.expect("body")
    }

    async fn stop(self) {
        self.metrics.stop().await;
        self.handle.stop().await;
    }
}

/// The sum of the samples of `name` whose labels include all of `labels` (0 if none).
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            (n == name && labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))))
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

#[tokio::test]
async fn request_counters_and_histograms_move_with_real_requests() {
    let s = start().await;
    let created = [
        ("api", "network"),
        ("method", "POST"),
        ("route", "/v2.0/networks"),
        ("status", "201"),
    ];
    let missing = [
        ("api", "network"),
        ("method", "GET"),
        ("route", "/v2.0/networks/{id}"),
        ("status", "404"),
    ];
    let before = s.scrape().await;
    assert_eq!(sample(&before, "isthmus_http_requests_total", &created), 0.0);
    let committed_before = sample(
        &before,
        "isthmus_store_txn_duration_seconds_count",
        &[("outcome", "committed")],
    );

    let (st, body) = send(
        &s.http,
        Method::POST,
        &format!("{}/v2.0/networks", s.network),
        Some(&s.token),
        Some(json!({"network": {"name": "m1"}})),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{body}");
    for _ in 0..2 {
        let (st, _) = send(
            &s.http,
            Method::GET,
            &format!("{}/v2.0/networks/no-such-network", s.network),
            Some(&s.token),
            None,
        )
        .await;
        assert_eq!(st, StatusCode::NOT_FOUND);
    }
    let (st, _) = send(
        &s.http,
        Method::GET,
        &format!("{}/no/such/path/x1", s.network),
        None,
        None,
    )
    .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let (st, _) = send(
        &s.http,
        Method::PATCH,
        &format!("{}/v2.0/networks", s.network),
        Some(&s.token),
        None,
    )
    .await;
    assert_eq!(st, StatusCode::METHOD_NOT_ALLOWED);

    let after = s.scrape().await;
    assert_eq!(sample(&after, "isthmus_http_requests_total", &created), 1.0, "{after}");
    assert_eq!(sample(&after, "isthmus_http_requests_total", &missing), 2.0, "{after}");
    assert_eq!(
        sample(&after, "isthmus_http_request_duration_seconds_count", &created),
        1.0
    );
    assert_eq!(
        sample(&after, "isthmus_http_request_duration_seconds_count", &missing),
        2.0
    );
    // Unknown paths are one label, never the path itself.
    assert_eq!(
        sample(
            &after,
            "isthmus_http_requests_total",
            &[("route", "unmatched"), ("status", "404")]
        ),
        1.0
    );
    assert!(!after.contains("x1"), "{after}");
    // A method the route lacks keeps the route's label.
    let not_allowed = [("method", "PATCH"), ("route", "/v2.0/networks"), ("status", "405")];
    assert_eq!(
        sample(&after, "isthmus_http_requests_total", &not_allowed),
        1.0,
        "{after}"
    );
    // Token issue went through the identity API.
    assert!(
        sample(
            &after,
            "isthmus_http_requests_total",
            &[("api", "identity"), ("route", "/v3/auth/tokens"), ("status", "201")]
        ) >= 1.0
    );
    // The network create wrote to the store and waited for the cache to show it.
    assert!(
        sample(
            &after,
            "isthmus_store_txn_duration_seconds_count",
            &[("outcome", "committed")]
        ) > committed_before
    );
    assert!(sample(&after, "isthmus_cache_watch_lag_seconds_count", &[]) >= 1.0);
    assert!(after.contains("isthmus_store_txn_conflicts_total 0"), "{after}");
    assert!(after.contains("isthmus_server_build_info{version=\""), "{after}");

    // A node stream open counts while it lives.
    assert_eq!(sample(&after, "isthmus_node_streams_open", &[]), 0.0);
    let stream = s
        .http
        .get(format!("{}/isthmus/v1/nodes/m-node/watch", s.network))
        .header("x-auth-token", &s.token)
        .send()
        .await
        .expect("watch");
    assert_eq!(stream.status(), StatusCode::OK);
    assert_eq!(sample(&s.scrape().await, "isthmus_node_streams_open", &[]), 1.0);
    drop(stream);
    let mut open = 1.0;
    for _ in 0..100 {
        open = sample(&s.scrape().await, "isthmus_node_streams_open", &[]);
        if open == 0.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(open, 0.0, "a closed stream is no longer counted");
    s.stop().await;
}

#[tokio::test]
async fn the_metrics_listener_answers_get_and_head_on_metrics_only() {
    let s = start().await;
    let base = format!("http://{}", s.metrics.addr);
    let head = s.http.head(format!("{base}/metrics")).send().await.expect("head");
    assert_eq!(head.status(), StatusCode::OK);
    let post = s.http.post(format!("{base}/metrics")).send().await.expect("post");
    assert_eq!(post.status(), StatusCode::METHOD_NOT_ALLOWED);
    let other = s.http.get(format!("{base}/v2.0/networks")).send().await.expect("get");
    assert_eq!(other.status(), StatusCode::NOT_FOUND);
    s.stop().await;
}

#[tokio::test]
async fn every_response_carries_a_request_id() {
    let s = start().await;
    let good = "req-3f2c1d7e-8a9b-4c0d-9e1f-2a3b4c5d6e7f";
    for url in [format!("{}/v2.0/networks", s.network), format!("{}/", s.identity)] {
        let id_of = |r: &reqwest::Response| {
            r.headers()
                .get("x-openstack-request-id")
                .map(|v| v.to_str().expect("ascii").to_string())
        };
        // A well-formed incoming id is kept.
        let r = s
            .http
            .get(&url)
            .header("x-auth-token", &s.token)
            .header("X-Openstack-Request-Id", good)
            .send()
            .await
            .expect("request");
        assert_eq!(id_of(&r).as_deref(), Some(good), "{url}");
        // Anything else is replaced by a fresh one.
        let r = s
            .http
            .get(&url)
            .header("x-auth-token", &s.token)
            .header("X-Openstack-Request-Id", "req-<script>alert(1)</script>")
            .send()
            .await
            .expect("request");
        let got = id_of(&r).expect("an id");
        assert!(
            got.starts_with("req-") && got.len() == 40 && !got.contains('<'),
            "{got}"
        );
        // None sent: one is made, a new one per request, errors included.
        let mut seen = std::collections::HashSet::new();
        for _ in 0..2 {
            let r = s.http.get(&url).send().await.expect("request");
            let got = id_of(&r).expect("an id");
            assert!(got.starts_with("req-") && got.len() == 40, "{got}");
            assert!(seen.insert(got));
        }
    }
    s.stop().await;
}
