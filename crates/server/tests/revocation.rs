//! Token revocation that lasts: a token issued before its user or project was disabled, or
//! before a role of its user on its project was removed, stays invalid after the change is
//! undone (Keystone's revocation events). Real server on loopback, both store backends.

mod support;

use reqwest::{Method, StatusCode};
use serde_json::json;
use support::{send, Backend, TestServer, MEMBER_PASSWORD};

support::on_both_backends!(
    disabled_then_enabled_user_keeps_old_tokens_dead,
    disabled_then_enabled_project_keeps_old_tokens_dead,
    removed_then_regranted_role_keeps_old_tokens_dead,
    deleted_then_recreated_role_keeps_old_tokens_dead,
);

/// `GET /v3/auth/tokens` for `subject`, as the admin: 200 when valid, 404 when not.
async fn validate(s: &TestServer, subject: &str) -> StatusCode {
    let admin = s.admin_token().await;
    let resp = s
        .http
        .get(format!("{}/auth/tokens", s.identity_url))
        .header("X-Auth-Token", &admin)
        .header("X-Subject-Token", subject)
        .send()
        .await
        .expect("validate request");
    resp.status()
}

/// The network API with `token`: status of a list of networks.
async fn network_status(s: &TestServer, token: &str) -> StatusCode {
    s.api(token).get("/v2.0/networks").await.0
}

/// The old token fails everywhere; a new one works.
async fn assert_old_dead_new_works(s: &TestServer, old: &str, user: &str, project: &str, what: &str) {
    assert_eq!(
        validate(s, old).await,
        StatusCode::NOT_FOUND,
        "{what}: old token validates"
    );
    assert_eq!(
        network_status(s, old).await,
        StatusCode::UNAUTHORIZED,
        "{what}: old token accepted by the network API"
    );
    let fresh = s.token(user, MEMBER_PASSWORD, project).await;
    assert_eq!(validate(s, &fresh).await, StatusCode::OK, "{what}: new token");
    assert_eq!(network_status(s, &fresh).await, StatusCode::OK, "{what}: new token");
}

async fn patch(s: &TestServer, path: &str, body: serde_json::Value) {
    let (st, b) = s.identity(Method::PATCH, path, Some(body)).await;
    assert_eq!(st, StatusCode::OK, "PATCH {path}: {b}");
}

async fn disabled_then_enabled_user_keeps_old_tokens_dead(backend: Backend) {
    let s = TestServer::start(backend).await;
    let m = s.member("ru").await;
    assert_eq!(validate(&s, &m.token).await, StatusCode::OK);
    assert_eq!(network_status(&s, &m.token).await, StatusCode::OK);

    let path = format!("/users/{}", m.user_id);
    patch(&s, &path, json!({"user": {"enabled": false}})).await;
    assert_eq!(validate(&s, &m.token).await, StatusCode::NOT_FOUND, "while disabled");
    patch(&s, &path, json!({"user": {"enabled": true}})).await;
    assert_old_dead_new_works(&s, &m.token, &m.user, &m.project, "user re-enabled").await;
}

async fn disabled_then_enabled_project_keeps_old_tokens_dead(backend: Backend) {
    let s = TestServer::start(backend).await;
    let m = s.member("rp").await;
    // Another project of the same user is not affected.
    let other = s.create_project("rp-other").await;
    s.grant(&other, &m.user_id, "member").await;
    let other_token = s.token(&m.user, MEMBER_PASSWORD, "rp-other").await;

    let path = format!("/projects/{}", m.project_id);
    patch(&s, &path, json!({"project": {"enabled": false}})).await;
    assert_eq!(
        network_status(&s, &m.token).await,
        StatusCode::UNAUTHORIZED,
        "while disabled"
    );
    patch(&s, &path, json!({"project": {"enabled": true}})).await;
    assert_old_dead_new_works(&s, &m.token, &m.user, &m.project, "project re-enabled").await;
    assert_eq!(
        validate(&s, &other_token).await,
        StatusCode::OK,
        "other project's token"
    );
}

async fn removed_then_regranted_role_keeps_old_tokens_dead(backend: Backend) {
    let s = TestServer::start(backend).await;
    let m = s.member("rr").await;
    let role = s.role_id("member").await;
    let path = format!("/projects/{}/users/{}/roles/{role}", m.project_id, m.user_id);
    let (st, b) = s.identity(Method::DELETE, &path, None).await;
    assert_eq!(st, StatusCode::NO_CONTENT, "unassign: {b}");
    assert_eq!(validate(&s, &m.token).await, StatusCode::NOT_FOUND, "while unassigned");
    let (st, b) = s.identity(Method::PUT, &path, None).await;
    assert_eq!(st, StatusCode::NO_CONTENT, "reassign: {b}");
    assert_old_dead_new_works(&s, &m.token, &m.user, &m.project, "role re-granted").await;
}

async fn deleted_then_recreated_role_keeps_old_tokens_dead(backend: Backend) {
    let s = TestServer::start(backend).await;
    let m = s.member("rd").await;
    // A custom role as the user's only one on a second project.
    let (st, b) = s
        .identity(Method::POST, "/roles", Some(json!({"role": {"name": "observer"}})))
        .await;
    assert_eq!(st, StatusCode::CREATED, "{b}");
    let project = s.create_project("rd-second").await;
    s.grant(&project, &m.user_id, "observer").await;
    let old = s.token(&m.user, MEMBER_PASSWORD, "rd-second").await;
    assert_eq!(validate(&s, &old).await, StatusCode::OK);

    let role = s.role_id("observer").await;
    let (st, b) = s.identity(Method::DELETE, &format!("/roles/{role}"), None).await;
    assert_eq!(st, StatusCode::NO_CONTENT, "{b}");
    let (st, b) = s
        .identity(Method::POST, "/roles", Some(json!({"role": {"name": "observer"}})))
        .await;
    assert_eq!(st, StatusCode::CREATED, "{b}");
    s.grant(&project, &m.user_id, "observer").await;
    assert_old_dead_new_works(&s, &old, &m.user, "rd-second", "role recreated").await;
}

/// Revocation events are shared through the store: a second server on the same etcd refuses
/// a token whose user was disabled and re-enabled through the first one.
#[tokio::test]
async fn events_reach_every_server() {
    let a = TestServer::start(Backend::Etcd).await;
    let etcd = a.etcd().expect("etcd backend");
    let b = TestServer::start_on_etcd(etcd, |_| {}).await;
    let m = a.member("rs").await;
    assert_eq!(validate(&b, &m.token).await, StatusCode::OK);
    let path = format!("/users/{}", m.user_id);
    patch(&a, &path, json!({"user": {"enabled": false}})).await;
    patch(&a, &path, json!({"user": {"enabled": true}})).await;
    // The second server's cache follows the store's watch: wait until it shows the user
    // enabled again, then the old token must still be refused there.
    let mut enabled = false;
    for _ in 0..100 {
        let (st, body) = b.identity(Method::GET, &path, None).await;
        assert_eq!(st, StatusCode::OK, "{body}");
        if body["user"]["enabled"] == json!(true) {
            enabled = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(enabled, "second server never saw the user enabled again");
    assert_eq!(
        validate(&b, &m.token).await,
        StatusCode::NOT_FOUND,
        "second server accepts the old token"
    );
    let (st, _) = send(
        &b.http,
        Method::GET,
        &format!("{}/v2.0/networks", b.network_url),
        Some(&m.token),
        None,
    )
    .await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
}

/// Events live one token lifetime: once every token they could match has expired, the next
/// event write prunes them from the store.
#[tokio::test]
async fn events_are_pruned_after_a_token_lifetime() {
    use isthmus_store::Store;
    let s = TestServer::start_with(Backend::Etcd, |c| c.token_ttl_secs = 1).await;
    let etcd = s.etcd().expect("etcd backend");
    let store = isthmus_store::etcd::EtcdStore::connect(vec![etcd.endpoint()])
        .await
        .expect("connect to etcd");
    let events = || async {
        let (kvs, _) = store
            .list("/isthmus/v1/identity/revoke_events/")
            .await
            .expect("list events");
        kvs.into_iter().map(|kv| kv.key).collect::<Vec<_>>()
    };
    let first = s.create_user("prune-1", MEMBER_PASSWORD).await;
    let second = s.create_user("prune-2", MEMBER_PASSWORD).await;
    patch(&s, &format!("/users/{first}"), json!({"user": {"enabled": false}})).await;
    assert_eq!(
        events().await,
        vec![format!("/isthmus/v1/identity/revoke_events/users/{first}")]
    );
    tokio::time::sleep(std::time::Duration::from_millis(1300)).await;
    patch(&s, &format!("/users/{second}"), json!({"user": {"enabled": false}})).await;
    assert_eq!(
        events().await,
        vec![format!("/isthmus/v1/identity/revoke_events/users/{second}")],
        "the expired event was kept, or the fresh one dropped"
    );
}
