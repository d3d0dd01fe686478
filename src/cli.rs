//! The command line (the README's "Command line" table).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use crate::config::Config;
use crate::ledger::Ledger;
use crate::money::Micros;

#[derive(Debug, Parser)]
#[command(name = "tollgate", version, about = "A reverse proxy that makes callers pay for APIs")]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

const DEFAULT_CONFIG: &str = "config/tollgate.toml";

#[derive(Debug, Subcommand)]
enum Command {
    /// Start the gateway.
    Run {
        #[arg(long, short, default_value = DEFAULT_CONFIG, env = "TOLLGATE_CONFIG")]
        config: PathBuf,
    },
    /// Validate a config file; print every error with its key path.
    Check {
        #[arg(long, short, default_value = DEFAULT_CONFIG, env = "TOLLGATE_CONFIG")]
        config: PathBuf,
    },
    /// Start a sample upstream behind tollgate with a temporary ledger and a funded key.
    Demo {
        /// Address of the demo gateway.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: String,
        /// Address of the demo admin listener.
        #[arg(long, default_value = "127.0.0.1:9090")]
        admin_listen: String,
    },
    /// Manage API keys in the configured ledger.
    Keys {
        #[arg(long, short, default_value = DEFAULT_CONFIG, env = "TOLLGATE_CONFIG", global = true)]
        config: PathBuf,
        /// Print JSON objects (as the admin API returns them).
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Check upstreams, the ledger and facilitators; show what paying clients will hit.
    Doctor {
        #[arg(long, short, default_value = DEFAULT_CONFIG, env = "TOLLGATE_CONFIG")]
        config: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Create a key; its secret is printed once.
    Create {
        #[arg(long, default_value = "0")]
        balance: String,
        #[arg(long)]
        label: Option<String>,
    },
    /// Add funds to a key.
    Credit {
        key_id: String,
        amount: String,
        /// Names this top-up in the whole ledger: repeating it (same key and amount)
        /// changes nothing; reusing it for another key or amount is refused.
        #[arg(long)]
        idempotency_key: Option<String>,
    },
    /// Show one key.
    Show { key_id: String },
    /// List all keys.
    List,
    /// Revoke a key: it can no longer pay.
    Revoke { key_id: String },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => check(&config),
        Command::Run { config } => {
            let cfg = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            crate::telemetry::init(&cfg.log);
            runtime(cfg.server.worker_threads).block_on(run(cfg, config))
        }
        Command::Demo { listen, admin_listen } => {
            crate::telemetry::init(&Default::default());
            runtime(None).block_on(crate::demo::run(&listen, &admin_listen))
        }
        Command::Keys { config, json, command } => {
            let cfg = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            runtime(Some(1)).block_on(keys(cfg, json, command))
        }
        Command::Doctor { config } => {
            let cfg = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            runtime(None).block_on(crate::doctor::doctor(cfg))
        }
    }
}

/// One worker thread means the current-thread scheduler: the same event loop as a
/// single nginx worker, without the work-stealing machinery a lone worker cannot use.
fn runtime(workers: Option<usize>) -> tokio::runtime::Runtime {
    let mut b = match workers {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    b.enable_all().build().expect("tokio runtime")
}

fn load(path: &Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("{}: {} error(s):", path.display(), e.0.len());
        for line in &e.0 {
            eprintln!("  {line}");
        }
        ExitCode::from(1)
    })
}

fn check(path: &Path) -> ExitCode {
    match load(path) {
        Ok(cfg) => {
            let priced = cfg.routes.iter().filter(|r| !r.pricing.is_free()).count();
            println!(
                "{}: ok ({} upstream(s), {} route(s), {} priced)",
                path.display(),
                cfg.upstreams.len(),
                cfg.routes.len(),
                priced
            );
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

async fn run(cfg: Config, path: PathBuf) -> ExitCode {
    let signals = match crate::app::Signals::install() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: cannot install signal handlers: {e}");
            return ExitCode::from(1);
        }
    };
    let ledger = match crate::app::open_ledger(&cfg).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    match crate::app::start(cfg, Some(path), ledger, crate::app::default_rails()).await {
        Ok(running) => {
            crate::app::run_until_signalled(running, signals).await;
            ExitCode::SUCCESS
        }
        Err(e) => {
            for line in &e.0 {
                eprintln!("error: {line}");
            }
            ExitCode::from(1)
        }
    }
}

async fn keys(cfg: Config, json: bool, command: KeysCommand) -> ExitCode {
    let ledger: Arc<dyn Ledger> = match crate::app::open_ledger(&cfg).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    let money = |s: &str| Micros::parse(s).map_err(|e| format!("bad amount {s:?}: {e}"));
    let result: Result<(serde_json::Value, String), String> = async {
        match command {
            KeysCommand::Create { balance, label } => {
                let k = ledger.create_key(label.as_deref(), money(&balance)?).await.map_err(|e| e.to_string())?;
                let text = format!(
                    "id:      {}\nkey:     {}\nbalance: {} USD\n\nThe key is shown only this once; store it now.",
                    k.id, k.key, k.balance
                );
                Ok((serde_json::json!(k), text))
            }
            KeysCommand::Credit { key_id, amount, idempotency_key } => {
                let amt = money(&amount)?;
                if amt.get() == 0 {
                    return Err("amount must be above zero".to_owned());
                }
                let o = ledger.credit(&key_id, amt, idempotency_key.as_deref()).await.map_err(|e| e.to_string())?;
                let text = if o.applied {
                    format!("credited {amt} USD to {key_id}; balance {} USD", o.balance)
                } else {
                    format!(
                        "already applied (same idempotency key, key and amount): nothing changed; balance {} USD",
                        o.balance
                    )
                };
                Ok((serde_json::json!({"id": key_id, "balance": o.balance.to_string(), "applied": o.applied}), text))
            }
            KeysCommand::Show { key_id } => {
                let k = ledger
                    .key(&key_id)
                    .await
                    .map_err(|e| e.to_string())?
                    .ok_or(format!("no key with id {key_id:?}"))?;
                let text = key_line(&k);
                Ok((serde_json::json!(k), text))
            }
            KeysCommand::List => {
                let keys = ledger.list_keys().await.map_err(|e| e.to_string())?;
                let text = if keys.is_empty() {
                    "no keys".to_owned()
                } else {
                    keys.iter().map(key_line).collect::<Vec<_>>().join("\n")
                };
                Ok((serde_json::json!({ "keys": keys }), text))
            }
            KeysCommand::Revoke { key_id } => {
                if !ledger.revoke(&key_id).await.map_err(|e| e.to_string())? {
                    return Err(format!("no key with id {key_id:?}"));
                }
                Ok((serde_json::json!({"id": key_id, "revoked": true}), format!("revoked {key_id}")))
            }
        }
    }
    .await;
    match result {
        Ok((v, text)) => {
            if json {
                println!("{v}");
            } else {
                println!("{text}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

fn key_line(k: &crate::ledger::KeyInfo) -> String {
    format!(
        "{}  balance {} USD  {}{}",
        k.id,
        k.balance,
        if k.revoked { "REVOKED  " } else { "" },
        k.label.as_deref().map(|l| format!("label {l:?}")).unwrap_or_default()
    )
}
