//! `isthmus keys`: the token signing key directory, rotated without downtime.

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use isthmus_server::identity::keys;
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum KeysCmd {
    /// Write a new signing key; it verifies at once and signs after the staging period, by
    /// when every server has read it (they re-read the directory every minute and on
    /// SIGHUP). Keys no unexpired token can carry any more are deleted.
    Rotate(RotateArgs),
    /// List the keys and what each does now.
    List(DirArg),
}

#[derive(Args)]
pub struct DirArg {
    /// The key directory (the servers' --token-key-dir).
    #[arg(long, env = "ISTHMUS_TOKEN_KEY_DIR", default_value = "/var/lib/isthmus/token-keys")]
    dir: PathBuf,
}

#[derive(Args)]
pub struct RotateArgs {
    #[command(flatten)]
    dir: DirArg,
    /// Seconds before the new key starts signing: at least the servers' key re-read interval
    /// (token_key_reload_secs, 60) plus the time to copy the key to every server.
    #[arg(long, default_value_t = 180)]
    stage_secs: u64,
    /// Sign with the new key at once: only when one server uses the directory.
    #[arg(long, conflicts_with = "stage_secs")]
    activate_now: bool,
    /// The servers' token lifetime, seconds: an old key is kept this long (plus the margin)
    /// after the next key started signing.
    #[arg(long, env = "ISTHMUS_TOKEN_TTL", default_value_t = 3600)]
    token_ttl: u64,
    /// Extra seconds old keys are kept (clock skew, slow copies).
    #[arg(long, default_value_t = 600)]
    margin_secs: u64,
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn secs(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub fn run(cmd: KeysCmd) -> Result<()> {
    match cmd {
        KeysCmd::Rotate(a) => rotate(a),
        KeysCmd::List(a) => list(&a),
    }
}

fn rotate(a: RotateArgs) -> Result<()> {
    let dir = &a.dir.dir;
    let now = now();
    keys::create_dir(dir)?;
    // Refuses a directory or key others could read before adding to it.
    let before = keys::load_dir(dir)?;
    let activates = if a.activate_now || before.is_empty() {
        now
    } else {
        now.saturating_add(secs(a.stage_secs))
    };
    let id = keys::write_key(dir, activates).with_context(|| format!("writing a key into {}", dir.display()))?;
    println!("new key {id}: verifies now, signs from {}", when(activates, now));
    let gone = keys::prune_dir(dir, now, secs(a.token_ttl).saturating_add(secs(a.margin_secs)))?;
    for g in gone {
        println!("deleted key {g} (no unexpired token can carry it)");
    }
    println!(
        "Copy {} to every server's key directory (unless they share it); they read it within \
         a minute, or at once on SIGHUP (systemctl reload isthmus-server).",
        dir.join(format!("{id}.key")).display()
    );
    Ok(())
}

fn when(t: i64, now: i64) -> String {
    if t <= now {
        "now".into()
    } else {
        format!("{t} (in {} s)", t - now)
    }
}

fn list(a: &DirArg) -> Result<()> {
    let now = now();
    let ring = keys::load_dir(&a.dir)?;
    let signer = ring.signer(now).map(|k| k.id.clone());
    for id in ring.ids() {
        let activates = keys::parse_key_id(id).unwrap_or_default();
        let role = if Some(id) == signer.as_deref() {
            "signing".to_string()
        } else if activates > now {
            format!("staged, signs from {}", when(activates, now))
        } else {
            "verifying only".to_string()
        };
        println!("{id}  {role}");
    }
    Ok(())
}
