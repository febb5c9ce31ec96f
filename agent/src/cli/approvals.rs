//! `airlock approvals`, `airlock approve`, `airlock deny`: the approval API
//! from the command line.

use clap::Args;

use crate::{
    config::Config,
    model::{ActionKind, ApprovalRequest},
};

/// How to reach the API and who you are.
#[derive(Debug, Args)]
pub struct ApiArgs {
    /// Your approver token (or set AIRLOCK_TOKEN).
    #[arg(long, env = "AIRLOCK_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// The API's base URL. Default: http:// + api_listen from the config.
    #[arg(long, value_name = "URL")]
    pub api: Option<String>,
}

/// List approval requests.
#[derive(Debug, Args)]
pub struct ApprovalsArgs {
    /// Only the pending ones.
    #[arg(long)]
    pub pending: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub api: ApiArgs,
}

/// Approve or deny one pending request.
#[derive(Debug, Args)]
pub struct DecideArgs {
    /// The request id (see `airlock approvals --pending`).
    pub id: u64,
    /// Why; stored with the decision in the record.
    #[arg(long)]
    pub reason: Option<String>,
    /// Print the resolved request as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub api: ApiArgs,
}

fn client(
    api: &ApiArgs,
    config: &Config,
) -> anyhow::Result<(reqwest::blocking::Client, String, String)> {
    let Some(token) = api.token.clone() else {
        anyhow::bail!("no approver token: pass --token or set AIRLOCK_TOKEN");
    };
    let base = api
        .api
        .clone()
        .unwrap_or_else(|| format!("http://{}", config.api_listen));
    Ok((
        reqwest::blocking::Client::new(),
        base.trim_end_matches('/').to_string(),
        token,
    ))
}

/// Turns an error response into its JSON `error` message.
fn check(resp: reqwest::blocking::Response) -> anyhow::Result<reqwest::blocking::Response> {
    if resp.status().is_success() {
        return Ok(resp);
    }
    let status = resp.status();
    let body: serde_json::Value = resp.json().unwrap_or_default();
    anyhow::bail!(
        "{} ({status})",
        body["error"].as_str().unwrap_or("request failed")
    )
}

pub fn list(args: ApprovalsArgs, config: &Config) -> anyhow::Result<()> {
    let (client, base, token) = client(&args.api, config)?;
    let mut url = format!("{base}/v1/requests");
    if args.pending {
        url.push_str("?state=pending");
    }
    let resp = client
        .get(&url)
        .bearer_auth(token)
        .send()
        .map_err(|e| anyhow::anyhow!("cannot reach the approval API at {base}: {e}"))?;
    let reqs: Vec<ApprovalRequest> = check(resp)?.json()?;
    if args.json {
        return super::print_json(&reqs);
    }
    println!(
        "{:>5}  {:<10}  {:>7}  {:<8}  {:>7}  {:<20}  {:<24}  ACTION",
        "ID", "STATE", "SESSION", "KIND", "PID", "RULE", "DEADLINE"
    );
    for r in reqs {
        println!(
            "{:>5}  {:<10}  {:>7}  {:<8}  {:>7}  {:<20}  {:<24}  {}",
            r.id,
            r.state.name(),
            r.session_id,
            r.kind.name(),
            r.tgid,
            r.rule,
            super::time(r.deadline),
            describe(&r)
        );
        if let Some(c) = &r.context {
            println!("{:>5}  {}", "", context_line(c));
        }
    }
    Ok(())
}

/// Where an exec runs and with which environment, on one line: the
/// variables whose values are shown, then how many others are set.
fn context_line(c: &crate::model::ExecContext) -> String {
    let shown: Vec<String> = c
        .env
        .iter()
        .filter(|(_, v)| v != "(set)")
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let others = c.env.len() - shown.len();
    format!(
        "in {}; env: {}{}{}",
        c.cwd.as_deref().unwrap_or("?"),
        shown.join(" "),
        if others > 0 {
            format!(" (+{others} more set)")
        } else {
            String::new()
        },
        if c.env_complete {
            ""
        } else {
            " (environment not read whole)"
        }
    )
}

pub fn decide(args: DecideArgs, config: &Config, approve: bool) -> anyhow::Result<()> {
    let (client, base, token) = client(&args.api, config)?;
    let verb = if approve { "approve" } else { "deny" };
    let resp = client
        .post(format!("{base}/v1/requests/{}/{verb}", args.id))
        .bearer_auth(token)
        .json(&serde_json::json!({ "reason": args.reason }))
        .send()
        .map_err(|e| anyhow::anyhow!("cannot reach the approval API at {base}: {e}"))?;
    let r: ApprovalRequest = check(resp)?.json()?;
    if args.json {
        return super::print_json(&r);
    }
    println!(
        "request {} {}: {}",
        r.id,
        r.state.name(),
        r.outcome.as_deref().unwrap_or("")
    );
    Ok(())
}

/// One line for the held action.
pub fn describe(r: &ApprovalRequest) -> String {
    let a = &r.action;
    match r.kind {
        ActionKind::Exec => {
            let argv: Vec<&str> = a["argv"]
                .as_array()
                .map(|v| v.iter().filter_map(|x| x.as_str()).collect())
                .unwrap_or_default();
            format!("{} [{}]", a["path"].as_str().unwrap_or(""), argv.join(" "))
        }
        ActionKind::File => format!(
            "{} {}",
            if a["write"].as_bool() == Some(true) {
                "write"
            } else {
                "read"
            },
            a["path"].as_str().unwrap_or("")
        ),
        ActionKind::Connect if a["socket"].is_string() => format!(
            "unix{} {}",
            if a["datagram"].as_bool() == Some(true) {
                " datagram"
            } else {
                ""
            },
            a["socket"].as_str().unwrap_or("")
        ),
        ActionKind::Connect => format!(
            "{} {}:{}",
            a["protocol"].as_str().unwrap_or(""),
            a["addr"].as_str().unwrap_or(""),
            a["port"]
        ),
    }
}
