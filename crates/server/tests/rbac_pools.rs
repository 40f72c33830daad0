//! RBAC policies on subnet pools and address scopes (`rbac-subnetpool`, `rbac-address-scope`)
//! end to end on both store backends: sharing with one project or every project, what the
//! others see and may use, the in-use checks, and the `shared` flag as the `*` policy.

mod support;

use reqwest::StatusCode;
use serde_json::{json, Value};
use support::{assert_neutron_error, created_policy, id_of, policy, projects, Api, Backend, TestServer};

support::on_both_backends!(
    sharing_a_pool_with_one_project,
    sharing_a_scope_with_one_project,
    wildcard_policies_are_the_shared_flag,
    bad_policies_on_pools_and_scopes,
);

async fn pool(api: &Api, attrs: Value) -> (StatusCode, Value) {
    api.post("/v2.0/subnetpools", json!({ "subnetpool": attrs })).await
}

/// A /24 from pool `pool_id` on a new network of the caller's.
async fn subnet_from(api: &Api, pool_id: &str) -> (StatusCode, Value) {
    let net = id_of(&api.network("n").await);
    api.post(
        "/v2.0/subnets",
        json!({"subnet": {"network_id": net, "ip_version": 4, "subnetpool_id": pool_id, "prefixlen": 24}}),
    )
    .await
}

async fn status(api: &Api, path: &str) -> StatusCode {
    api.get(path).await.0
}

async fn sharing_a_pool_with_one_project(b: Backend) {
    let s = TestServer::start(b).await;
    let (owner, guest, third) = projects(&s).await;
    let (st, body) = pool(&owner.api, json!({"name": "p", "prefixes": ["10.90.0.0/16"]})).await;
    assert_eq!(st, StatusCode::CREATED, "{body}");
    let pid = id_of(&body["subnetpool"]);
    let path = format!("/v2.0/subnetpools/{pid}");

    let rbac = created_policy(&owner.api, "subnetpool", &pid, "access_as_shared", &guest.project_id).await;
    let (_, got) = owner.api.get(&format!("/v2.0/rbac-policies/{rbac}")).await;
    assert_eq!(got["rbac_policy"]["object_type"], "subnetpool", "{got}");
    assert_eq!(got["rbac_policy"]["target_tenant"], json!(guest.project_id), "{got}");

    // The guest sees the pool, shared for it; the owner's view is not shared.
    let (st, got) = guest.api.get(&path).await;
    assert_eq!(st, StatusCode::OK, "{got}");
    assert_eq!(got["subnetpool"]["shared"], true, "{got}");
    assert_eq!(
        guest.api.ids("/v2.0/subnetpools?shared=true", "subnetpools").await,
        std::slice::from_ref(&pid)
    );
    let (_, got) = owner.api.get(&path).await;
    assert_eq!(got["subnetpool"]["shared"], false, "{got}");
    assert!(owner
        .api
        .list("/v2.0/subnetpools?shared=true", "subnetpools")
        .await
        .is_empty());
    // It does not see the policy, as for networks.
    assert!(guest.api.list("/v2.0/rbac-policies", "rbac_policies").await.is_empty());

    // The third project neither sees nor uses the pool.
    let (st, body) = third.api.get(&path).await;
    assert_neutron_error(st, &body, StatusCode::NOT_FOUND, Some("SubnetPoolNotFound"));
    assert!(third.api.list("/v2.0/subnetpools", "subnetpools").await.is_empty());
    let (st, body) = subnet_from(&third.api, &pid).await;
    assert_neutron_error(st, &body, StatusCode::NOT_FOUND, Some("SubnetPoolNotFound"));

    // The guest allocates a subnet from it; the grant cannot go or move while it exists.
    let (st, body) = subnet_from(&guest.api, &pid).await;
    assert_eq!(st, StatusCode::CREATED, "{body}");
    assert_eq!(body["subnet"]["subnetpool_id"], json!(pid));
    let sub = id_of(&body["subnet"]);
    let rpath = format!("/v2.0/rbac-policies/{rbac}");
    let (st, body) = owner.api.delete(&rpath).await;
    assert_neutron_error(st, &body, StatusCode::CONFLICT, Some("RbacPolicyInUse"));
    let (st, body) = owner
        .api
        .put(&rpath, json!({"rbac_policy": {"target_tenant": third.project_id}}))
        .await;
    assert_neutron_error(st, &body, StatusCode::CONFLICT, Some("RbacPolicyInUse"));
    assert_eq!(status(&guest.api, &path).await, StatusCode::OK);

    // Without the subnet it goes, and the guest loses the pool.
    let (st, _) = guest.api.delete(&format!("/v2.0/subnets/{sub}")).await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (st, body) = owner.api.delete(&rpath).await;
    assert_eq!(st, StatusCode::NO_CONTENT, "{body}");
    assert_eq!(status(&guest.api, &path).await, StatusCode::NOT_FOUND);
    let (st, body) = subnet_from(&guest.api, &pid).await;
    assert_neutron_error(st, &body, StatusCode::NOT_FOUND, Some("SubnetPoolNotFound"));

    // Deleting the pool deletes its policies.
    let again = created_policy(&owner.api, "subnetpool", &pid, "access_as_shared", &third.project_id).await;
    let (st, body) = owner.api.delete(&path).await;
    assert_eq!(st, StatusCode::NO_CONTENT, "{body}");
    let (st, _) = s.admin.get(&format!("/v2.0/rbac-policies/{again}")).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    assert!(s
        .admin
        .list(&format!("/v2.0/rbac-policies?object_id={pid}"), "rbac_policies")
        .await
        .is_empty());
}

async fn sharing_a_scope_with_one_project(b: Backend) {
    let s = TestServer::start(b).await;
    let (owner, guest, third) = projects(&s).await;
    let scope = id_of(
        &owner
            .api
            .create("address-scopes", "address_scope", json!({"name": "a", "ip_version": 4}))
            .await,
    );
    let path = format!("/v2.0/address-scopes/{scope}");
    let rbac = created_policy(
        &owner.api,
        "address_scope",
        &scope,
        "access_as_shared",
        &guest.project_id,
    )
    .await;

    // The guest sees the scope and puts a pool in it; the third project does neither.
    let (st, got) = guest.api.get(&path).await;
    assert_eq!(st, StatusCode::OK, "{got}");
    assert_eq!(got["address_scope"]["shared"], true, "{got}");
    assert_eq!(
        guest
            .api
            .ids("/v2.0/address-scopes?shared=true", "address_scopes")
            .await,
        std::slice::from_ref(&scope)
    );
    let (_, got) = owner.api.get(&path).await;
    assert_eq!(got["address_scope"]["shared"], false, "{got}");
    let (st, body) = third.api.get(&path).await;
    assert_neutron_error(st, &body, StatusCode::NOT_FOUND, Some("AddressScopeNotFound"));
    assert!(third
        .api
        .list("/v2.0/address-scopes", "address_scopes")
        .await
        .is_empty());
    let (st, body) = pool(
        &third.api,
        json!({"prefixes": ["10.91.0.0/16"], "address_scope_id": scope}),
    )
    .await;
    assert_neutron_error(st, &body, StatusCode::NOT_FOUND, Some("AddressScopeNotFound"));
    let (st, body) = pool(
        &guest.api,
        json!({"prefixes": ["10.92.0.0/16"], "address_scope_id": scope}),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{body}");
    assert_eq!(body["subnetpool"]["address_scope_id"], json!(scope));
    let guest_pool = id_of(&body["subnetpool"]);

    // The guest's pool holds the grant.
    let rpath = format!("/v2.0/rbac-policies/{rbac}");
    let (st, body) = owner.api.delete(&rpath).await;
    assert_neutron_error(st, &body, StatusCode::CONFLICT, Some("RbacPolicyInUse"));
    let (st, body) = owner
        .api
        .put(&rpath, json!({"rbac_policy": {"target_tenant": third.project_id}}))
        .await;
    assert_neutron_error(st, &body, StatusCode::CONFLICT, Some("RbacPolicyInUse"));
    let (st, _) = guest.api.delete(&format!("/v2.0/subnetpools/{guest_pool}")).await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (st, body) = owner
        .api
        .put(&rpath, json!({"rbac_policy": {"target_tenant": third.project_id}}))
        .await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert_eq!(status(&guest.api, &path).await, StatusCode::NOT_FOUND);
    assert_eq!(status(&third.api, &path).await, StatusCode::OK);

    // Deleting the scope deletes its policies.
    let (st, body) = owner.api.delete(&path).await;
    assert_eq!(st, StatusCode::NO_CONTENT, "{body}");
    let (st, _) = owner.api.get(&rpath).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
}

/// The admin's `*` policies on the pool or scope at `path` (e.g. `subnetpools/<id>`).
async fn wildcards(s: &TestServer, id: &str) -> Vec<Value> {
    s.admin
        .list(
            &format!("/v2.0/rbac-policies?object_id={id}&target_tenant=*"),
            "rbac_policies",
        )
        .await
}

async fn wildcard_policies_are_the_shared_flag(b: Backend) {
    let s = TestServer::start(b).await;
    let (owner, _guest, third) = projects(&s).await;

    // A pool created shared has its `*` policy, owned by the pool's project.
    let (st, body) = pool(
        &s.admin,
        json!({"prefixes": ["10.93.0.0/16"], "shared": true, "project_id": owner.project_id}),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{body}");
    let pid = id_of(&body["subnetpool"]);
    let path = format!("/v2.0/subnetpools/{pid}");
    let wild = wildcards(&s, &pid).await;
    assert_eq!(wild.len(), 1, "{wild:?}");
    assert_eq!(wild[0]["object_type"], "subnetpool");
    assert_eq!(wild[0]["action"], "access_as_shared");
    assert_eq!(wild[0]["project_id"], json!(owner.project_id));
    let (st, body) = policy(&s.admin, "subnetpool", &pid, "access_as_shared", "*").await;
    assert_neutron_error(st, &body, StatusCode::CONFLICT, Some("DuplicateRbacPolicy"));

    // Unsharing is refused while the third project has a subnet from it.
    let (st, body) = subnet_from(&third.api, &pid).await;
    assert_eq!(st, StatusCode::CREATED, "{body}");
    let sub = id_of(&body["subnet"]);
    let (st, body) = s.admin.put(&path, json!({"subnetpool": {"shared": false}})).await;
    assert_neutron_error(st, &body, StatusCode::CONFLICT, Some("RbacPolicyInUse"));
    let (st, body) = s
        .admin
        .delete(&format!("/v2.0/rbac-policies/{}", id_of(&wild[0])))
        .await;
    assert_neutron_error(st, &body, StatusCode::CONFLICT, Some("RbacPolicyInUse"));
    let (st, _) = third.api.delete(&format!("/v2.0/subnets/{sub}")).await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (st, body) = s.admin.put(&path, json!({"subnetpool": {"shared": false}})).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert_eq!(body["subnetpool"]["shared"], false, "{body}");
    assert!(wildcards(&s, &pid).await.is_empty());
    assert_eq!(status(&third.api, &path).await, StatusCode::NOT_FOUND);

    // Creating the `*` policy sets the flag for everyone; deleting it clears it.
    let (st, body) = policy(&owner.api, "subnetpool", &pid, "access_as_shared", "*").await;
    assert_neutron_error(st, &body, StatusCode::FORBIDDEN, Some("PolicyNotAuthorized"));
    let w = created_policy(&s.admin, "subnetpool", &pid, "access_as_shared", "*").await;
    for api in [&owner.api, &third.api] {
        let (st, got) = api.get(&path).await;
        assert_eq!(st, StatusCode::OK, "{got}");
        assert_eq!(got["subnetpool"]["shared"], true, "{got}");
    }
    assert_eq!(
        third.api.ids("/v2.0/subnetpools?shared=true", "subnetpools").await,
        std::slice::from_ref(&pid)
    );
    let (st, _) = s.admin.delete(&format!("/v2.0/rbac-policies/{w}")).await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (_, got) = owner.api.get(&path).await;
    assert_eq!(got["subnetpool"]["shared"], false, "{got}");
    assert!(third
        .api
        .list("/v2.0/subnetpools?shared=true", "subnetpools")
        .await
        .is_empty());
    // Updating `shared` to true makes the policy again.
    let (st, body) = s.admin.put(&path, json!({"subnetpool": {"shared": true}})).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert_eq!(wildcards(&s, &pid).await.len(), 1);

    // The same for an address scope, held by the third project's pool in it.
    let scope = id_of(
        &owner
            .api
            .create("address-scopes", "address_scope", json!({"name": "a", "ip_version": 4}))
            .await,
    );
    let spath = format!("/v2.0/address-scopes/{scope}");
    let (st, body) = s.admin.put(&spath, json!({"address_scope": {"shared": true}})).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    let wild = wildcards(&s, &scope).await;
    assert_eq!(wild.len(), 1, "{wild:?}");
    assert_eq!(wild[0]["object_type"], "address_scope");
    let (st, body) = pool(
        &third.api,
        json!({"prefixes": ["10.94.0.0/16"], "address_scope_id": scope}),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{body}");
    let third_pool = id_of(&body["subnetpool"]);
    let (st, body) = s.admin.put(&spath, json!({"address_scope": {"shared": false}})).await;
    assert_neutron_error(st, &body, StatusCode::CONFLICT, Some("RbacPolicyInUse"));
    let (st, body) = s
        .admin
        .delete(&format!("/v2.0/rbac-policies/{}", id_of(&wild[0])))
        .await;
    assert_neutron_error(st, &body, StatusCode::CONFLICT, Some("RbacPolicyInUse"));
    let (st, _) = third.api.delete(&format!("/v2.0/subnetpools/{third_pool}")).await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (st, _) = s
        .admin
        .delete(&format!("/v2.0/rbac-policies/{}", id_of(&wild[0])))
        .await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (_, got) = owner.api.get(&spath).await;
    assert_eq!(got["address_scope"]["shared"], false, "{got}");
    assert_eq!(status(&third.api, &spath).await, StatusCode::NOT_FOUND);
    // A scope created shared has its policy from the start, and it goes with the scope.
    let shared = id_of(
        &s.admin
            .create(
                "address-scopes",
                "address_scope",
                json!({"name": "everyone", "ip_version": 4, "shared": true}),
            )
            .await,
    );
    let wild = wildcards(&s, &shared).await;
    assert_eq!(wild.len(), 1, "{wild:?}");
    let (st, _) = s.admin.delete(&format!("/v2.0/address-scopes/{shared}")).await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (st, _) = s.admin.get(&format!("/v2.0/rbac-policies/{}", id_of(&wild[0]))).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
}

async fn bad_policies_on_pools_and_scopes(b: Backend) {
    let s = TestServer::start(b).await;
    let (owner, guest, third) = projects(&s).await;
    let (_, body) = pool(&owner.api, json!({"prefixes": ["10.95.0.0/16"]})).await;
    let pid = id_of(&body["subnetpool"]);
    let scope = id_of(
        &owner
            .api
            .create("address-scopes", "address_scope", json!({"name": "a", "ip_version": 4}))
            .await,
    );
    let g = &guest.project_id;
    let missing = "7d8c3b7e-0c77-4a38-9b2b-51b6b2e1f0aa";

    for (otype, id, kind) in [
        ("subnetpool", &pid, "SubnetPoolNotFound"),
        ("address_scope", &scope, "AddressScopeNotFound"),
    ] {
        let (st, body) = policy(&owner.api, otype, missing, "access_as_shared", g).await;
        assert_neutron_error(st, &body, StatusCode::NOT_FOUND, Some(kind));
        // Only sharing applies to pools and scopes.
        let (st, body) = policy(&owner.api, otype, id, "access_as_external", g).await;
        assert_neutron_error(st, &body, StatusCode::BAD_REQUEST, Some("InvalidActionForType"));
        // Another project's object it cannot see is not found.
        let (st, body) = policy(&third.api, otype, id, "access_as_shared", &third.project_id).await;
        assert_neutron_error(st, &body, StatusCode::NOT_FOUND, Some(kind));
        created_policy(&owner.api, otype, id, "access_as_shared", g).await;
        let (st, body) = policy(&owner.api, otype, id, "access_as_shared", g).await;
        assert_neutron_error(st, &body, StatusCode::CONFLICT, Some("DuplicateRbacPolicy"));
        // The project it is shared with may not pass it on.
        let (st, body) = policy(&guest.api, otype, id, "access_as_shared", &third.project_id).await;
        assert_neutron_error(st, &body, StatusCode::BAD_REQUEST, Some("InvalidInput"));
    }
    // Nor change the object itself.
    let (st, _) = guest
        .api
        .put(
            &format!("/v2.0/subnetpools/{pid}"),
            json!({"subnetpool": {"name": "x"}}),
        )
        .await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    let (st, _) = guest.api.delete(&format!("/v2.0/address-scopes/{scope}")).await;
    assert_eq!(st, StatusCode::FORBIDDEN);

    for alias in ["rbac-subnetpool", "rbac-address-scope"] {
        let (st, body) = owner.api.get(&format!("/v2.0/extensions/{alias}")).await;
        assert_eq!(st, StatusCode::OK, "{alias}: {body}");
    }
}
