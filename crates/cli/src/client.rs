//! Client commands: authenticate like the openstack CLI (OS_* environment) and show resources.

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use serde_json::Value;

#[derive(Args)]
pub struct ResourceCmd {
    #[command(subcommand)]
    action: Action,
    #[command(flatten)]
    auth: AuthArgs,
}

#[derive(Subcommand)]
enum Action {
    /// List (one line each).
    List {
        /// Filters, e.g. `network_id=...` (repeatable).
        #[arg(long = "filter", short = 'f')]
        filters: Vec<String>,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one, by id or name.
    Show { id: String },
}

#[derive(Args)]
struct AuthArgs {
    #[arg(long, env = "OS_AUTH_URL", default_value = "http://127.0.0.1:5000/v3")]
    os_auth_url: String,
    #[arg(long, env = "OS_USERNAME", default_value = "admin")]
    os_username: String,
    #[arg(long, env = "OS_PASSWORD", hide_env_values = true)]
    os_password: Option<String>,
    #[arg(long, env = "OS_PROJECT_NAME", default_value = "admin")]
    os_project_name: String,
    #[arg(long, env = "OS_USER_DOMAIN_NAME", default_value = "Default")]
    os_user_domain_name: String,
    #[arg(long, env = "OS_PROJECT_DOMAIN_NAME", default_value = "Default")]
    os_project_domain_name: String,
    /// CA bundle (PEM) that verifies an https server (`isthmus up --tls` writes it into the
    /// openrc); by default the system's trusted roots.
    #[arg(long, env = "OS_CACERT")]
    os_cacert: Option<std::path::PathBuf>,
}

struct Session {
    client: isthmus_client::Client,
}

async fn login(a: &AuthArgs) -> Result<Session> {
    use isthmus_client::{Auth, Config, Domain};
    let password = a
        .os_password
        .clone()
        .ok_or_else(|| anyhow!("no password: set OS_PASSWORD (or source the openrc that `isthmus up` wrote)"))?;
    let auth = Auth::Password {
        user: a.os_username.clone(),
        user_domain: Domain::Name(a.os_user_domain_name.clone()),
        password,
        project: a.os_project_name.clone(),
        project_domain: Domain::Name(a.os_project_domain_name.clone()),
    };
    let client = isthmus_client::Client::new(Config::new(&a.os_auth_url, auth).ca_file(a.os_cacert.as_deref()))?;
    // Authenticate now, so a wrong password or URL is reported as such.
    client
        .token(None)
        .await
        .with_context(|| format!("authenticating at {}", a.os_auth_url))?;
    Ok(Session { client })
}

impl Session {
    async fn get(&self, path: &str) -> Result<Value> {
        match self.client.neutron_get(path).await {
            Ok(v) => Ok(v),
            Err(e @ isthmus_client::Error::Status { .. }) => {
                let status = e.status().and_then(|s| reqwest::StatusCode::from_u16(s).ok());
                let msg = e.api_message().unwrap_or_else(|| match &e {
                    isthmus_client::Error::Status { body, .. } => {
                        serde_json::from_str::<Value>(body).unwrap_or(Value::Null).to_string()
                    }
                    _ => e.to_string(),
                });
                match status {
                    Some(s) => bail!("{s}: {msg}"),
                    None => bail!("{msg}"),
                }
            }
            Err(e) => Err(anyhow!(e)).with_context(|| format!("GET {}/v2.0/{path}", self.client.network_url())),
        }
    }
}

fn summary(plural: &str, item: &Value) -> String {
    let s = |k: &str| item[k].as_str().unwrap_or("").to_string();
    match plural {
        "networks" => format!(
            "{}  {:<24} subnets={}",
            s("id"),
            s("name"),
            item["subnets"].as_array().map(|a| a.len()).unwrap_or(0)
        ),
        "subnets" => format!("{}  {:<24} {} net={}", s("id"), s("name"), s("cidr"), s("network_id")),
        _ => {
            let ips: Vec<String> = item["fixed_ips"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|f| f["ip_address"].as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            format!(
                "{}  {:<20} {} {:<6} {}",
                s("id"),
                s("name"),
                s("mac_address"),
                s("status"),
                ips.join(",")
            )
        }
    }
}

/// Prints one line. A closed pipe (`| head`) ends the output quietly instead of panicking.
fn emit(line: &str) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{line}") {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        other => Ok(other?),
    }
}

pub async fn run(plural: &str, cmd: ResourceCmd) -> Result<()> {
    let session = login(&cmd.auth).await?;
    let singular = plural.trim_end_matches('s');
    match cmd.action {
        Action::List { filters, json } => {
            let q = filters.join("&");
            let v = session.get(&format!("{plural}?{q}")).await?;
            if json {
                emit(&serde_json::to_string_pretty(&v[plural])?)?;
            } else {
                for item in v[plural].as_array().into_iter().flatten() {
                    emit(&summary(plural, item))?;
                }
            }
        }
        Action::Show { id } => {
            let v = match session.get(&format!("{plural}/{id}")).await {
                Ok(v) => v[singular].clone(),
                Err(e) => {
                    // Fall back to a lookup by name, as the openstack CLI does.
                    let found = session.get(&format!("{plural}?name={id}")).await?;
                    match found[plural].as_array().map(|a| a.as_slice()) {
                        Some([one]) => one.clone(),
                        Some([]) | None => return Err(e),
                        Some(_) => bail!("more than one {singular} is named '{id}'; use the id"),
                    }
                }
            };
            emit(&serde_json::to_string_pretty(&v)?)?;
        }
    }
    Ok(())
}
