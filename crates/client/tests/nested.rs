//! The nested client against a real server on loopback (embedded store): a trunk credential
//! made with a Keystone token, then attach, get, release with the credential alone; a
//! refused credential comes back as an authentication error with the server's message.

use isthmus_client::{Auth, Client, Config, Error, NestedClient, NestedConfig, Url};
use isthmus_wire::nested::{AttachmentRequest, NestedMode};
use serde_json::json;
use std::time::Duration;

const ADMIN_PASSWORD: &str = "admin-secret-Pw1";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_get_release_with_a_trunk_credential() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let dir = tempfile::tempdir().unwrap();
        let config = isthmus_server::Config {
            identity_listen: "127.0.0.1:0".parse().unwrap(),
            network_listen: "127.0.0.1:0".parse().unwrap(),
            admin_password: Some(ADMIN_PASSWORD.into()),
            password_hash_kib: 64,
            ..isthmus_server::Config::default()
        };
        let store = isthmus_store::embedded::EmbeddedStore::open(&dir.path().join("store")).unwrap();
        let s = isthmus_server::start(config, store).await.unwrap();
        let admin = Client::new(Config::new(
            &format!("http://{}/v3", s.identity_addr),
            Auth::password("admin", ADMIN_PASSWORD, "admin"),
        ))
        .unwrap();
        let net = admin
            .neutron_create("networks", "network", &json!({"name": "vm"}))
            .await
            .unwrap();
        let net_id = net["id"].as_str().unwrap().to_string();
        admin
            .neutron_create(
                "subnets",
                "subnet",
                &json!({"network_id": net_id, "cidr": "10.90.0.0/24", "ip_version": 4}),
            )
            .await
            .unwrap();
        let parent = admin
            .neutron_create("ports", "port", &json!({"network_id": net_id}))
            .await
            .unwrap();
        let trunk = admin
            .neutron_create("trunks", "trunk", &json!({"port_id": parent["id"]}))
            .await
            .unwrap();
        let path = format!("/isthmus/v1/trunks/{}/credentials", trunk["id"].as_str().unwrap());
        let cred = admin
            .call(reqwest::Method::POST, Url::Network(&path), Some(&json!({})))
            .await
            .unwrap();
        let header = format!(
            "{}.{}",
            cred["credential"]["id"].as_str().unwrap(),
            cred["credential"]["secret"].as_str().unwrap()
        );
        let url = format!("http://{}", s.network_addr);

        let nested = NestedClient::new(NestedConfig::new(&url, &header)).unwrap();
        let req = AttachmentRequest {
            mode: NestedMode::Vlan,
            network_id: net_id.clone(),
        };
        let a = nested.attach("ctr1", "eth0", &req).await.unwrap();
        assert_eq!(a.vlan, Some(1));
        assert_eq!(a.addresses.len(), 1);
        assert_eq!(a.addresses[0].prefix_len, 24);
        assert_eq!(nested.attach("ctr1", "eth0", &req).await.unwrap(), a);
        assert_eq!(nested.get("ctr1", "eth0").await.unwrap(), Some(a.clone()));
        nested.release("ctr1", "eth0").await.unwrap();
        assert_eq!(nested.get("ctr1", "eth0").await.unwrap(), None);
        nested.release("ctr1", "eth0").await.unwrap();

        // The server's refusals come back with its message.
        let bad = NestedClient::new(NestedConfig::new(&url, "not-a-credential.nope")).unwrap();
        let e = bad.get("ctr1", "eth0").await.unwrap_err();
        assert!(matches!(e, Error::Auth { status: 401, .. }), "{e}");
        assert!(
            e.api_message()
                .is_some_and(|m| m.contains("X-Isthmus-Trunk-Credential")),
            "{e}"
        );
        let e = nested.attach("bad/../id", "eth0", &req).await.unwrap_err();
        assert_eq!(e.status(), Some(400), "{e}");
        assert!(e.api_message().is_some_and(|m| m.contains("container id")), "{e}");
        s.stop().await;
    })
    .await
    .expect("test timed out");
}
