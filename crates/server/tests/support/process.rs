//! One `isthmus server` process of the real binary, for the tests that start, signal and kill
//! it (`crash.rs`, `keys_ops.rs`): loopback ports of its own, the test admin password, cheap
//! password hashing, no quota, its log in a file.
#![allow(dead_code)]

use super::{issue_token, send, ADMIN_PASSWORD, ADMIN_PROJECT, ADMIN_USER};
use reqwest::{Method, StatusCode};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// One `isthmus server` process.
pub struct ServerProcess {
    pub child: Child,
    pub identity_url: String,
    pub network_url: String,
    pub log: PathBuf,
}

impl ServerProcess {
    /// Starts `isthmus server` with `args` after the common ones; `name` names its config and log.
    pub fn spawn(bin: &Path, work: &Path, name: &str, config: &str, args: &[&str]) -> ServerProcess {
        let config_path = work.join(format!("{name}.toml"));
        std::fs::write(&config_path, format!("password_hash_kib = 64\n{config}")).expect("write config");
        let log = work.join(format!("{name}.log"));
        let (id_port, net_port) = (free_port(), free_port());
        let out = std::fs::File::create(&log).expect("log file");
        let child = Command::new(bin)
            .arg("server")
            .arg("--config")
            .arg(&config_path)
            .args(["--identity-listen", &format!("127.0.0.1:{id_port}")])
            .args(["--network-listen", &format!("127.0.0.1:{net_port}")])
            .args(["--admin-password", ADMIN_PASSWORD, "--quota-default", "all=-1"])
            .args(args)
            .env("ISTHMUS_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log file"))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", bin.display()));
        ServerProcess {
            child,
            identity_url: format!("http://127.0.0.1:{id_port}/v3"),
            network_url: format!("http://127.0.0.1:{net_port}"),
            log,
        }
    }

    pub async fn start(bin: &Path, work: &Path, name: &str, config: &str, args: &[&str]) -> ServerProcess {
        let mut s = Self::spawn(bin, work, name, config, args);
        s.wait_ready().await;
        s
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last 30 lines of the log.
    pub fn log_tail(&self) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    pub async fn wait_ready(&mut self) {
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!("isthmus server exited during start-up ({status}):\n{}", self.log_tail());
            }
            let net_ok = http
                .get(format!("{}/", self.network_url))
                .send()
                .await
                .is_ok_and(|r| r.status() == StatusCode::OK);
            let id_ok = http.get(format!("{}/", self.identity_url)).send().await.is_ok();
            if id_ok && net_ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "isthmus server not ready within 60 s:\n{}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn signal(&self, sig: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid");
        // SAFETY: kill has no memory preconditions; the pid is our own child, not yet reaped.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "kill");
    }

    /// Waits up to `limit` for the process to exit; its status.
    pub async fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "server still running {limit:?} after the signal:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn token(&self, http: &reqwest::Client) -> String {
        issue_token(http, &self.identity_url, ADMIN_USER, ADMIN_PASSWORD, ADMIN_PROJECT).await
    }

    /// The status of a network API read with `token`.
    pub async fn check(&self, http: &reqwest::Client, token: &str) -> StatusCode {
        send(
            http,
            Method::GET,
            &format!("{}/v2.0/networks", self.network_url),
            Some(token),
            None,
        )
        .await
        .0
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
