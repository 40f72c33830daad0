//! RBAC policies (`rbac-policies`, `rbac-security-groups`) end to end on both store backends:
//! sharing a network or a security group with one project or every project, external access
//! for one project, the in-use checks, and what other projects see (nothing: 404).

mod support;

use reqwest::{Method, StatusCode};
use serde_json::json;
use support::{assert_neutron_error, created_policy, id_of, policy, projects, Backend, TestServer};

support::on_both_backends!(
    sharing_a_network_with_one_project,
    wildcard_sharing_is_the_shared_flag,
    external_access_for_one_project,
    external_policies_cover_each_other,
    sharing_a_security_group,
    bad_requests_and_methods,
);

async fn sharing_a_network_with_one_project(b: Backend) {
    let s = TestServer::start(b).await;
    let (owner, guest, third) = projects(&s).await;
    let net = id_of(&owner.api.network("n").await);
    let sub = id_of(&owner.api.subnet(&net, "10.7.0.0/24").await);

    let (st, body) = policy(&owner.api, "network", &net, "access_as_shared", &guest.project_id).await;
    assert_eq!(st, StatusCode::CREATED, "{body}");
    let p = &body["rbac_policy"];
    let pid = id_of(p);
    assert_eq!(p["object_type"], "network");
    assert_eq!(p["object_id"], json!(net));
    assert_eq!(p["action"], "access_as_shared");
    assert_eq!(p["target_tenant"], json!(guest.project_id));
    assert_eq!(p["target_project"], json!(guest.project_id));
    assert_eq!(p["project_id"], json!(owner.project_id));

    // The guest sees the network (shared, for it), its subnet, and may put a port on it.
    let (st, got) = guest.api.get(&format!("/v2.0/networks/{net}")).await;
    assert_eq!(st, StatusCode::OK, "{got}");
    assert_eq!(got["network"]["shared"], true, "{got}");
    let shared = guest.api.ids("/v2.0/networks?shared=True", "networks").await;
    assert_eq!(shared, std::slice::from_ref(&net));
    let (_, got) = owner.api.get(&format!("/v2.0/networks/{net}")).await;
    assert_eq!(got["network"]["shared"], false, "shared only with one project: {got}");
    assert_eq!(
        guest.api.ids("/v2.0/subnets", "subnets").await,
        std::slice::from_ref(&sub)
    );
    let port = id_of(&guest.api.port(&net).await);

    // The policy: its owner sees it; as in Neutron, not even the project it targets does.
    assert_eq!(
        owner.api.ids("/v2.0/rbac-policies", "rbac_policies").await,
        std::slice::from_ref(&pid)
    );
    for m in [&guest, &third] {
        assert!(m.api.list("/v2.0/rbac-policies", "rbac_policies").await.is_empty());
        let (st, body) = m.api.get(&format!("/v2.0/rbac-policies/{pid}")).await;
        assert_neutron_error(st, &body, StatusCode::NOT_FOUND, Some("RbacPolicyNotFound"));
    }
    let filtered = owner
        .api
        .ids(
            &format!(
                "/v2.0/rbac-policies?object_id={net}&action=access_as_shared&target_tenant={}",
                guest.project_id
            ),
            "rbac_policies",
        )
        .await;
    assert_eq!(filtered, std::slice::from_ref(&pid));

    // A third project sees none of it.
    let (st, body) = third.api.get(&format!("/v2.0/networks/{net}")).await;
    assert_neutron_error(st, &body, StatusCode::NOT_FOUND, Some("NetworkNotFound"));
    assert!(third.api.list("/v2.0/networks", "networks").await.is_empty());
    assert!(third.api.list("/v2.0/subnets", "subnets").await.is_empty());
    let (st, body) = third
        .api
        .post("/v2.0/ports", json!({"port": {"network_id": net}}))
        .await;
    assert_neutron_error(st, &body, StatusCode::NOT_FOUND, Some("NetworkNotFound"));

    // The target cannot remove the owner's policy.
    let (st, body) = guest.api.delete(&format!("/v2.0/rbac-policies/{pid}")).await;
    assert_neutron_error(st, &body, StatusCode::NOT_FOUND, Some("RbacPolicyNotFound"));

    // The guest's port depends on the policy: neither removing nor moving it is allowed.
    let (st, body) = owner.api.delete(&format!("/v2.0/rbac-policies/{pid}")).await;
    assert_neutron_error(st, &body, StatusCode::CONFLICT, Some("RbacPolicyInUse"));
    let (st, body) = owner
        .api
        .put(
            &format!("/v2.0/rbac-policies/{pid}"),
            json!({"rbac_policy": {"target_tenant": third.project_id}}),
        )
        .await;
    assert_neutron_error(st, &body, StatusCode::CONFLICT, Some("RbacPolicyInUse"));

    // Without the port it may be moved, and the access moves with it.
    let (st, _) = guest.api.delete(&format!("/v2.0/ports/{port}")).await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (st, body) = owner
        .api
        .put(
            &format!("/v2.0/rbac-policies/{pid}"),
            json!({"rbac_policy": {"target_tenant": third.project_id}}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert_eq!(body["rbac_policy"]["target_tenant"], json!(third.project_id));
    let (st, _) = third.api.get(&format!("/v2.0/networks/{net}")).await;
    assert_eq!(st, StatusCode::OK);
    let (st, _) = guest.api.get(&format!("/v2.0/networks/{net}")).await;
    assert_eq!(st, StatusCode::NOT_FOUND);

    let (st, body) = owner.api.delete(&format!("/v2.0/rbac-policies/{pid}")).await;
    assert_eq!(st, StatusCode::NO_CONTENT, "{body}");
    let (st, _) = third.api.get(&format!("/v2.0/networks/{net}")).await;
    assert_eq!(st, StatusCode::NOT_FOUND);

    // Deleting the network deletes its policies.
    created_policy(&owner.api, "network", &net, "access_as_shared", &guest.project_id).await;
    let (st, body) = owner.api.delete(&format!("/v2.0/networks/{net}")).await;
    assert_eq!(st, StatusCode::NO_CONTENT, "{body}");
    assert!(s.admin.list("/v2.0/rbac-policies", "rbac_policies").await.is_empty());
    let (st, body) = policy(&owner.api, "network", &net, "access_as_shared", &guest.project_id).await;
    assert_neutron_error(st, &body, StatusCode::NOT_FOUND, Some("NetworkNotFound"));
}

async fn wildcard_sharing_is_the_shared_flag(b: Backend) {
    let s = TestServer::start(b).await;
    let (owner, guest, third) = projects(&s).await;
    let net = id_of(&owner.api.network("n").await);
    owner.api.subnet(&net, "10.8.0.0/24").await;

    // Members may not share with everyone.
    let (st, body) = policy(&owner.api, "network", &net, "access_as_shared", "*").await;
    assert_neutron_error(st, &body, StatusCode::FORBIDDEN, Some("PolicyNotAuthorized"));

    // The admin's `*` policy is `shared: true`, for every project.
    let pid = created_policy(&s.admin, "network", &net, "access_as_shared", "*").await;
    for m in [&owner, &guest, &third] {
        let (st, got) = m.api.get(&format!("/v2.0/networks/{net}")).await;
        assert_eq!(st, StatusCode::OK, "{got}");
        assert_eq!(got["network"]["shared"], true, "{got}");
    }
    let (st, body) = policy(&s.admin, "network", &net, "access_as_shared", "*").await;
    assert_neutron_error(st, &body, StatusCode::CONFLICT, Some("DuplicateRbacPolicy"));
    let guest_policy = created_policy(&owner.api, "network", &net, "access_as_shared", &guest.project_id).await;
    let third_port = id_of(&third.api.port(&net).await);
    let guest_port = id_of(&guest.api.port(&net).await);

    // Unsharing is refused while the third project's port relies on the wildcard; the guest
    // has its own policy.
    let (st, body) = s
        .admin
        .put(&format!("/v2.0/networks/{net}"), json!({"network": {"shared": false}}))
        .await;
    assert_neutron_error(st, &body, StatusCode::CONFLICT, Some("InvalidSharedSetting"));
    let (st, body) = s.admin.delete(&format!("/v2.0/rbac-policies/{pid}")).await;
    assert_neutron_error(st, &body, StatusCode::CONFLICT, Some("RbacPolicyInUse"));
    let (st, _) = third.api.delete(&format!("/v2.0/ports/{third_port}")).await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (st, body) = s
        .admin
        .put(&format!("/v2.0/networks/{net}"), json!({"network": {"shared": false}}))
        .await;
    assert_eq!(st, StatusCode::OK, "{body}");
    let (st, _) = s.admin.get(&format!("/v2.0/rbac-policies/{pid}")).await;
    assert_eq!(st, StatusCode::NOT_FOUND, "unsharing removed the wildcard policy");
    let (st, _) = third.api.get(&format!("/v2.0/networks/{net}")).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let (_, got) = guest.api.get(&format!("/v2.0/networks/{net}")).await;
    assert_eq!(got["network"]["shared"], true, "{got}");
    let (st, body) = owner.api.delete(&format!("/v2.0/rbac-policies/{guest_policy}")).await;
    assert_neutron_error(st, &body, StatusCode::CONFLICT, Some("RbacPolicyInUse"));
    let (st, _) = guest.api.delete(&format!("/v2.0/ports/{guest_port}")).await;
    assert_eq!(st, StatusCode::NO_CONTENT);

    // `shared: true` makes the wildcard policy; deleting that policy clears the flag.
    let (st, body) = s
        .admin
        .put(&format!("/v2.0/networks/{net}"), json!({"network": {"shared": true}}))
        .await;
    assert_eq!(st, StatusCode::OK, "{body}");
    let wild = s
        .admin
        .list(
            &format!("/v2.0/rbac-policies?object_id={net}&target_tenant=*"),
            "rbac_policies",
        )
        .await;
    assert_eq!(wild.len(), 1, "{wild:?}");
    assert_eq!(wild[0]["action"], "access_as_shared");
    assert_eq!(wild[0]["project_id"], json!(owner.project_id));
    assert_eq!(
        third.api.ids("/v2.0/networks?shared=true", "networks").await,
        std::slice::from_ref(&net)
    );
    let (st, _) = s
        .admin
        .delete(&format!("/v2.0/rbac-policies/{}", id_of(&wild[0])))
        .await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (_, got) = s.admin.get(&format!("/v2.0/networks/{net}")).await;
    assert_eq!(got["network"]["shared"], false, "{got}");
    assert!(third
        .api
        .list("/v2.0/networks?shared=true", "networks")
        .await
        .is_empty());

    // A network created shared has its wildcard policy from the start.
    let net2 = id_of(
        &s.admin
            .create("networks", "network", json!({"name": "everyone", "shared": true}))
            .await,
    );
    let wild = s
        .admin
        .ids(
            &format!("/v2.0/rbac-policies?object_id={net2}&target_tenant=*"),
            "rbac_policies",
        )
        .await;
    assert_eq!(wild.len(), 1);
    let (st, _) = s.admin.delete(&format!("/v2.0/networks/{net2}")).await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (st, _) = s.admin.get(&format!("/v2.0/rbac-policies/{}", wild[0])).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
}

async fn external_access_for_one_project(b: Backend) {
    let s = TestServer::start(b).await;
    let (_, guest, third) = projects(&s).await;
    let public = id_of(
        &s.admin
            .create(
                "networks",
                "network",
                json!({"name": "public", "provider:network_type": "flat", "provider:physical_network": "physnet1"}),
            )
            .await,
    );
    s.admin
        .create(
            "subnets",
            "subnet",
            json!({"network_id": public, "cidr": "203.0.113.0/24", "ip_version": 4, "enable_dhcp": false}),
        )
        .await;

    // A policy for one project makes the network external, for that project only.
    let pid = created_policy(&s.admin, "network", &public, "access_as_external", &guest.project_id).await;
    let (_, got) = s.admin.get(&format!("/v2.0/networks/{public}")).await;
    assert_eq!(got["network"]["router:external"], true, "{got}");
    let (st, got) = guest.api.get(&format!("/v2.0/networks/{public}")).await;
    assert_eq!(st, StatusCode::OK, "{got}");
    assert_eq!(got["network"]["router:external"], true);
    assert_eq!(got["network"]["shared"], false);
    let external = guest.api.ids("/v2.0/networks?router:external=True", "networks").await;
    assert_eq!(external, std::slice::from_ref(&public));
    let (st, body) = third.api.get(&format!("/v2.0/networks/{public}")).await;
    assert_neutron_error(st, &body, StatusCode::NOT_FOUND, Some("NetworkNotFound"));

    // The guest sets a router gateway on it and allocates a floating IP; the third cannot.
    let router = id_of(
        &guest
            .api
            .create(
                "routers",
                "router",
                json!({"name": "r", "external_gateway_info": {"network_id": public}}),
            )
            .await,
    );
    let fip = id_of(
        &guest
            .api
            .create("floatingips", "floatingip", json!({"floating_network_id": public}))
            .await,
    );
    let (st, body) = third
        .api
        .post(
            "/v2.0/routers",
            json!({"router": {"name": "r", "external_gateway_info": {"network_id": public}}}),
        )
        .await;
    assert_neutron_error(st, &body, StatusCode::NOT_FOUND, Some("NetworkNotFound"));
    let (st, body) = third
        .api
        .post(
            "/v2.0/floatingips",
            json!({"floatingip": {"floating_network_id": public}}),
        )
        .await;
    assert_neutron_error(st, &body, StatusCode::NOT_FOUND, Some("NetworkNotFound"));

    // While they exist the policy stays.
    let (st, body) = s.admin.delete(&format!("/v2.0/rbac-policies/{pid}")).await;
    assert_neutron_error(st, &body, StatusCode::CONFLICT, Some("RbacPolicyInUse"));
    let (st, _) = guest.api.delete(&format!("/v2.0/floatingips/{fip}")).await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (st, body) = s.admin.delete(&format!("/v2.0/rbac-policies/{pid}")).await;
    assert_neutron_error(st, &body, StatusCode::CONFLICT, Some("RbacPolicyInUse"));
    let (st, body) = guest
        .api
        .put(
            &format!("/v2.0/routers/{router}"),
            json!({"router": {"external_gateway_info": {}}}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{body}");

    // The last external policy gone, the network is no longer external.
    let (st, body) = s.admin.delete(&format!("/v2.0/rbac-policies/{pid}")).await;
    assert_eq!(st, StatusCode::NO_CONTENT, "{body}");
    let (_, got) = s.admin.get(&format!("/v2.0/networks/{public}")).await;
    assert_eq!(got["network"]["router:external"], false, "{got}");
    let (st, _) = guest.api.get(&format!("/v2.0/networks/{public}")).await;
    assert_eq!(st, StatusCode::NOT_FOUND);

    // `router:external: true` is a wildcard access_as_external policy.
    let (st, body) = s
        .admin
        .put(
            &format!("/v2.0/networks/{public}"),
            json!({"network": {"router:external": true}}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{body}");
    let wild = s
        .admin
        .list(&format!("/v2.0/rbac-policies?object_id={public}"), "rbac_policies")
        .await;
    assert_eq!(wild.len(), 1, "{wild:?}");
    assert_eq!(wild[0]["action"], "access_as_external");
    assert_eq!(wild[0]["target_tenant"], "*");
    let (st, _) = third.api.get(&format!("/v2.0/networks/{public}")).await;
    assert_eq!(st, StatusCode::OK);
    // The owner's own gateway keeps the network external: its last policy stays.
    let own_router = id_of(
        &s.admin
            .create(
                "routers",
                "router",
                json!({"name": "own", "external_gateway_info": {"network_id": public}}),
            )
            .await,
    );
    let (st, body) = s
        .admin
        .delete(&format!("/v2.0/rbac-policies/{}", id_of(&wild[0])))
        .await;
    assert_neutron_error(st, &body, StatusCode::CONFLICT, Some("ExternalNetworkInUse"));
    let (st, _) = s.admin.delete(&format!("/v2.0/routers/{own_router}")).await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (st, body) = s
        .admin
        .put(
            &format!("/v2.0/networks/{public}"),
            json!({"network": {"router:external": false}}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert!(s
        .admin
        .list(&format!("/v2.0/rbac-policies?object_id={public}"), "rbac_policies")
        .await
        .is_empty());
}

/// What neutron-tempest-plugin checks of external policies: a member's own network made
/// external for one project, a wildcard that stays while a router needs it, and a project's
/// own policy and the wildcard each releasing the other. Also self-shares and revisions.
async fn external_policies_cover_each_other(b: Backend) {
    let s = TestServer::start(b).await;
    let (owner, guest, _) = projects(&s).await;
    let own = id_of(&owner.api.network("own").await);
    owner.api.subnet(&own, "10.9.0.0/24").await;
    let (st, body) = policy(&owner.api, "network", &own, "access_as_external", "*").await;
    assert_neutron_error(st, &body, StatusCode::FORBIDDEN, Some("PolicyNotAuthorized"));
    created_policy(&owner.api, "network", &own, "access_as_external", &guest.project_id).await;
    assert!(guest.api.ids("/v2.0/networks", "networks").await.contains(&own));
    let r1 = id_of(
        &guest
            .api
            .create(
                "routers",
                "router",
                json!({"name": "r1", "external_gateway_info": {"network_id": own}}),
            )
            .await,
    );

    let net = id_of(&s.admin.network("ext").await);
    s.admin
        .create(
            "subnets",
            "subnet",
            json!({"network_id": net, "cidr": "198.51.100.0/24", "ip_version": 4, "enable_dhcp": false}),
        )
        .await;
    let wildcard = created_policy(&s.admin, "network", &net, "access_as_external", "*").await;
    let r2 = id_of(
        &guest
            .api
            .create(
                "routers",
                "router",
                json!({"name": "r2", "external_gateway_info": {"network_id": net}}),
            )
            .await,
    );
    let (st, body) = s.admin.delete(&format!("/v2.0/rbac-policies/{wildcard}")).await;
    assert_neutron_error(st, &body, StatusCode::CONFLICT, Some("RbacPolicyInUse"));
    let mine = created_policy(&s.admin, "network", &net, "access_as_external", &guest.project_id).await;
    let (st, body) = s.admin.delete(&format!("/v2.0/rbac-policies/{wildcard}")).await;
    assert_eq!(st, StatusCode::NO_CONTENT, "the project's own policy covers it: {body}");
    let (st, body) = s.admin.delete(&format!("/v2.0/rbac-policies/{mine}")).await;
    assert_neutron_error(st, &body, StatusCode::CONFLICT, Some("RbacPolicyInUse"));
    let wildcard = created_policy(&s.admin, "network", &net, "access_as_external", "*").await;
    let (st, body) = s.admin.delete(&format!("/v2.0/rbac-policies/{mine}")).await;
    assert_eq!(st, StatusCode::NO_CONTENT, "the wildcard covers it: {body}");
    for r in [&r1, &r2] {
        let (st, _) = guest.api.delete(&format!("/v2.0/routers/{r}")).await;
        assert_eq!(st, StatusCode::NO_CONTENT);
    }
    let (st, body) = s.admin.delete(&format!("/v2.0/rbac-policies/{wildcard}")).await;
    assert_eq!(st, StatusCode::NO_CONTENT, "{body}");
    let (st, body) = guest
        .api
        .post(
            "/v2.0/routers",
            json!({"router": {"name": "r3", "external_gateway_info": {"network_id": net}}}),
        )
        .await;
    assert_neutron_error(st, &body, StatusCode::NOT_FOUND, Some("NetworkNotFound"));

    // A shared-with-everyone policy bumps the network's revision; removing a shared policy
    // leaves router:external alone.
    let (_, before) = s.admin.get(&format!("/v2.0/networks/{own}")).await;
    let shared = created_policy(&s.admin, "network", &own, "access_as_shared", "*").await;
    let (_, after) = s.admin.get(&format!("/v2.0/networks/{own}")).await;
    assert!(
        after["network"]["revision_number"].as_u64() > before["network"]["revision_number"].as_u64(),
        "{before} {after}"
    );
    let (st, _) = s.admin.delete(&format!("/v2.0/rbac-policies/{shared}")).await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (_, got) = s.admin.get(&format!("/v2.0/networks/{own}")).await;
    assert_eq!(got["network"]["router:external"], true, "{got}");

    // Sharing with oneself never holds anything up; the network's owner may delete others'
    // ports on it.
    let me = created_policy(&owner.api, "network", &own, "access_as_shared", &owner.project_id).await;
    let mine_port = id_of(&owner.api.port(&own).await);
    let (st, body) = owner
        .api
        .put(
            &format!("/v2.0/rbac-policies/{me}"),
            json!({"rbac_policy": {"target_tenant": guest.project_id}}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{body}");
    let guest_port = id_of(&guest.api.port(&own).await);
    let (st, body) = owner.api.delete(&format!("/v2.0/ports/{guest_port}")).await;
    assert_eq!(st, StatusCode::NO_CONTENT, "{body}");
    let (st, body) = owner.api.delete(&format!("/v2.0/rbac-policies/{me}")).await;
    assert_eq!(st, StatusCode::NO_CONTENT, "{body}");
    let (st, _) = owner.api.delete(&format!("/v2.0/ports/{mine_port}")).await;
    assert_eq!(st, StatusCode::NO_CONTENT);
}

async fn sharing_a_security_group(b: Backend) {
    let s = TestServer::start(b).await;
    let (owner, guest, third) = projects(&s).await;
    let sg = id_of(
        &owner
            .api
            .create("security-groups", "security_group", json!({"name": "web"}))
            .await,
    );
    let pid = created_policy(&owner.api, "security_group", &sg, "access_as_shared", &guest.project_id).await;

    let (st, got) = guest.api.get(&format!("/v2.0/security-groups/{sg}")).await;
    assert_eq!(st, StatusCode::OK, "{got}");
    assert!(guest
        .api
        .ids("/v2.0/security-groups", "security_groups")
        .await
        .contains(&sg));
    let (st, body) = third.api.get(&format!("/v2.0/security-groups/{sg}")).await;
    assert_neutron_error(st, &body, StatusCode::NOT_FOUND, Some("SecurityGroupNotFound"));
    assert!(!third
        .api
        .ids("/v2.0/security-groups", "security_groups")
        .await
        .contains(&sg));

    // The guest uses it on its own port, but may not change it.
    let gnet = id_of(&guest.api.network("g").await);
    guest.api.subnet(&gnet, "10.5.0.0/24").await;
    let port = guest
        .api
        .create("ports", "port", json!({"network_id": gnet, "security_groups": [sg]}))
        .await;
    assert_eq!(port["security_groups"], json!([sg]));
    let (st, body) = guest
        .api
        .put(
            &format!("/v2.0/security-groups/{sg}"),
            json!({"security_group": {"name": "mine"}}),
        )
        .await;
    assert_neutron_error(st, &body, StatusCode::FORBIDDEN, Some("PolicyNotAuthorized"));
    let (st, body) = guest.api.delete(&format!("/v2.0/security-groups/{sg}")).await;
    assert_neutron_error(st, &body, StatusCode::FORBIDDEN, Some("PolicyNotAuthorized"));
    let tnet = id_of(&third.api.network("t").await);
    let (st, body) = third
        .api
        .post(
            "/v2.0/ports",
            json!({"port": {"network_id": tnet, "security_groups": [sg]}}),
        )
        .await;
    assert_neutron_error(st, &body, StatusCode::NOT_FOUND, Some("SecurityGroupNotFound"));

    // Security groups are only shared, never external.
    let (st, body) = policy(
        &owner.api,
        "security_group",
        &sg,
        "access_as_external",
        &guest.project_id,
    )
    .await;
    assert_neutron_error(st, &body, StatusCode::BAD_REQUEST, None);

    // In use by the guest's port: the policy stays until the port goes.
    let (st, body) = owner.api.delete(&format!("/v2.0/rbac-policies/{pid}")).await;
    assert_neutron_error(st, &body, StatusCode::CONFLICT, Some("RbacPolicyInUse"));
    let (st, _) = guest.api.delete(&format!("/v2.0/ports/{}", id_of(&port))).await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (st, body) = owner.api.delete(&format!("/v2.0/rbac-policies/{pid}")).await;
    assert_eq!(st, StatusCode::NO_CONTENT, "{body}");
    let (st, _) = guest.api.get(&format!("/v2.0/security-groups/{sg}")).await;
    assert_eq!(st, StatusCode::NOT_FOUND);

    // Deleting the group deletes its policies.
    created_policy(&owner.api, "security_group", &sg, "access_as_shared", &guest.project_id).await;
    let (st, body) = owner.api.delete(&format!("/v2.0/security-groups/{sg}")).await;
    assert_eq!(st, StatusCode::NO_CONTENT, "{body}");
    assert!(s.admin.list("/v2.0/rbac-policies", "rbac_policies").await.is_empty());
}

async fn bad_requests_and_methods(b: Backend) {
    let s = TestServer::start(b).await;
    let (owner, guest, third) = projects(&s).await;
    let net = id_of(&owner.api.network("n").await);
    let g = &guest.project_id;

    for (body, what) in [
        (
            json!({"object_type": "router", "object_id": net, "action": "access_as_shared", "target_tenant": g}),
            "unknown object type",
        ),
        (
            json!({"object_type": "network", "object_id": net, "action": "access_as_owner", "target_tenant": g}),
            "unknown action",
        ),
        (
            json!({"object_type": "network", "object_id": "not-a-uuid", "action": "access_as_shared", "target_tenant": g}),
            "object id",
        ),
        (
            json!({"object_type": "network", "object_id": net, "action": "access_as_shared", "target_tenant": "x"}),
            "target",
        ),
        (
            json!({"object_type": "network", "object_id": net, "action": "access_as_shared"}),
            "no target",
        ),
        (
            json!({"object_id": net, "action": "access_as_shared", "target_tenant": g}),
            "no object type",
        ),
        (
            json!({"object_type": "network", "object_id": net, "action": "access_as_shared", "target_tenant": g, "colour": "red"}),
            "unknown attribute",
        ),
    ] {
        let (st, b) = owner
            .api
            .post("/v2.0/rbac-policies", json!({ "rbac_policy": body }))
            .await;
        assert_neutron_error(st, &b, StatusCode::BAD_REQUEST, None);
        assert!(!b.to_string().is_empty(), "{what}");
    }

    let pid = created_policy(&owner.api, "network", &net, "access_as_shared", g).await;
    let (st, body) = policy(&owner.api, "network", &net, "access_as_shared", g).await;
    assert_neutron_error(st, &body, StatusCode::CONFLICT, Some("DuplicateRbacPolicy"));
    // The other spelling of the target names the same policy.
    let (st, body) = owner
        .api
        .post(
            "/v2.0/rbac-policies",
            json!({"rbac_policy": {"object_type": "network", "object_id": net,
                                   "action": "access_as_shared", "target_project": g}}),
        )
        .await;
    assert_neutron_error(st, &body, StatusCode::CONFLICT, Some("DuplicateRbacPolicy"));

    // Objects the caller cannot see are not found; seen but not owned is refused.
    let (st, body) = policy(&third.api, "network", &net, "access_as_shared", &third.project_id).await;
    assert_neutron_error(st, &body, StatusCode::NOT_FOUND, Some("NetworkNotFound"));
    let (st, body) = policy(&guest.api, "network", &net, "access_as_shared", &third.project_id).await;
    assert_neutron_error(st, &body, StatusCode::BAD_REQUEST, Some("InvalidInput"));
    let sg = id_of(
        &owner
            .api
            .create("security-groups", "security_group", json!({"name": "x"}))
            .await,
    );
    let (st, body) = policy(&third.api, "security_group", &sg, "access_as_shared", &third.project_id).await;
    assert_neutron_error(st, &body, StatusCode::NOT_FOUND, Some("SecurityGroupNotFound"));
    let missing = "7d8c3b7e-0c77-4a38-9b2b-51b6b2e1f0aa";
    let (st, body) = policy(&owner.api, "network", missing, "access_as_shared", g).await;
    assert_neutron_error(st, &body, StatusCode::NOT_FOUND, Some("NetworkNotFound"));

    // Only the target can change.
    let (st, body) = owner
        .api
        .put(
            &format!("/v2.0/rbac-policies/{pid}"),
            json!({"rbac_policy": {"action": "access_as_external"}}),
        )
        .await;
    assert_neutron_error(st, &body, StatusCode::BAD_REQUEST, None);
    let (st, body) = owner
        .api
        .put(
            &format!("/v2.0/rbac-policies/{pid}"),
            json!({"rbac_policy": {"target_tenant": "*"}}),
        )
        .await;
    assert_neutron_error(st, &body, StatusCode::FORBIDDEN, Some("PolicyNotAuthorized"));
    let (st, body) = third
        .api
        .put(
            &format!("/v2.0/rbac-policies/{pid}"),
            json!({"rbac_policy": {"target_tenant": third.project_id}}),
        )
        .await;
    assert_neutron_error(st, &body, StatusCode::NOT_FOUND, Some("RbacPolicyNotFound"));
    let (st, body) = owner.api.get(&format!("/v2.0/rbac-policies/{missing}")).await;
    assert_neutron_error(st, &body, StatusCode::NOT_FOUND, Some("RbacPolicyNotFound"));
    let (st, body) = owner.api.get("/v2.0/rbac-policies?colour=red").await;
    assert_neutron_error(st, &body, StatusCode::BAD_REQUEST, None);

    // Wrong methods.
    for (method, path) in [
        (Method::PUT, "/v2.0/rbac-policies".to_string()),
        (Method::DELETE, "/v2.0/rbac-policies".to_string()),
        (Method::POST, format!("/v2.0/rbac-policies/{pid}")),
        (Method::PATCH, format!("/v2.0/rbac-policies/{pid}")),
    ] {
        let (st, body) = owner.api.call(method.clone(), &path, Some(json!({}))).await;
        assert_neutron_error(st, &body, StatusCode::METHOD_NOT_ALLOWED, Some("HTTPMethodNotAllowed"));
    }

    // Advertised.
    for alias in ["rbac-policies", "rbac-security-groups"] {
        let (st, body) = owner.api.get(&format!("/v2.0/extensions/{alias}")).await;
        assert_eq!(st, StatusCode::OK, "{alias}: {body}");
    }
    let (_, index) = owner.api.get("/v2.0").await;
    assert!(
        index["resources"]
            .as_array()
            .is_some_and(|r| r.iter().any(|r| r["collection"] == "rbac-policies")),
        "{index}"
    );
}
