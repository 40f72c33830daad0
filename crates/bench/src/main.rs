//! `isthmus-bench`: benchmarks that start the real `isthmus server` binary (and etcd) and drive
//! it over HTTP, the way clients do. See docs/benchmarks.md.

mod api;
mod firewall;
mod fleet;
mod ports;
mod proc;
mod resync;
mod stats;
mod tls;

use clap::{Parser, Subcommand};
use std::process::ExitCode;
use tokio::signal::unix::{signal, Signal, SignalKind};

#[derive(Parser)]
#[command(
    name = "isthmus-bench",
    version,
    about = "Isthmus benchmarks against a real server process"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Port creation throughput and latency (POST /v2.0/ports), per store backend and client count.
    Ports(ports::PortsArgs),
    /// Agent datapath sync with many remote ports, against iproute2 batch mode (root).
    Resync(resync::ResyncArgs),
    /// One server, many simulated nodes with real node streams: fan-out latency, memory, CPU.
    Fleet(fleet::FleetArgs),
    /// Firewall programming: many ports, groups and rules, a large remote group (root).
    Firewall(firewall::FirewallArgs),
}

/// Signals that stop the benchmark. Registered before any child process starts, so the default
/// disposition (die without running destructors) never leaves a server or etcd behind.
struct Stop {
    int: Option<Signal>,
    term: Option<Signal>,
    hup: Option<Signal>,
}

impl Stop {
    fn register() -> Stop {
        Stop {
            int: signal(SignalKind::interrupt()).ok(),
            term: signal(SignalKind::terminate()).ok(),
            hup: signal(SignalKind::hangup()).ok(),
        }
    }

    async fn wait(&mut self) -> &'static str {
        async fn recv(s: &mut Option<Signal>) {
            match s {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        tokio::select! {
            _ = recv(&mut self.int) => "SIGINT",
            _ = recv(&mut self.term) => "SIGTERM",
            _ = recv(&mut self.hup) => "SIGHUP",
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut stop = Stop::register();
    let run = async {
        match cli.cmd {
            Cmd::Ports(args) => ports::run(&args).await,
            Cmd::Resync(args) => resync::run_bench(&args).await.map(|()| true),
            Cmd::Fleet(args) => fleet::run(&args).await,
            Cmd::Firewall(args) => tokio::task::block_in_place(|| firewall::run(&args)),
        }
    };
    // Leaving the select drops the benchmark future, and with it every server and etcd.
    let outcome = tokio::select! {
        r = run => r,
        sig = stop.wait() => {
            eprintln!("isthmus-bench: {sig}: stopped; servers killed");
            return ExitCode::from(130);
        }
    };
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("isthmus-bench: some requests failed (see above)");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("isthmus-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
