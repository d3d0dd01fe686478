//! `tollgate doctor`: is everything a paying client needs in place? Each upstream
//! reachable, the ledger read/write, each facilitator listing the configured networks,
//! and what an unpaid client of each route will be told.

use std::process::ExitCode;
use std::time::Duration;

use crate::config::Config;

/// Checks what a paying client depends on. Exit code 1 when anything fails.
pub(crate) async fn doctor(cfg: Config) -> ExitCode {
    let mut failures = 0;
    println!("config: ok");
    for u in &cfg.upstreams {
        let uri = u.url.uri();
        let host = uri.host().unwrap_or("").trim_start_matches('[').trim_end_matches(']').to_owned();
        let port = uri.port_u16().unwrap_or(if uri.scheme_str() == Some("https") { 443 } else { 80 });
        let timeout = u.connect_timeout;
        match tokio::time::timeout(timeout, tokio::net::TcpStream::connect((host.as_str(), port))).await {
            Ok(Ok(_)) => println!("upstream {}: reachable at {host}:{port}", u.name),
            Ok(Err(e)) => {
                failures += 1;
                println!("upstream {}: UNREACHABLE at {host}:{port}: {e}", u.name);
            }
            Err(_) => {
                failures += 1;
                println!("upstream {}: UNREACHABLE at {host}:{port}: no answer within {timeout:?}", u.name);
            }
        }
    }
    match crate::app::open_ledger(&cfg).await {
        Ok(l) => match tokio::time::timeout(Duration::from_secs(5), l.ping()).await {
            Ok(Ok(())) => println!("ledger ({:?}): read/write ok", cfg.ledger.backend),
            Ok(Err(e)) => {
                failures += 1;
                println!("ledger: FAILED read/write: {e}");
            }
            Err(_) => {
                failures += 1;
                println!("ledger: FAILED: no answer within 5s");
            }
        },
        Err(e) => {
            failures += 1;
            println!("ledger: FAILED to open: {e}");
        }
    }
    if let Some(x) = &cfg.x402 {
        match crate::payment::rails::x402::check_supported(x).await {
            Ok(kinds) => {
                for k in kinds {
                    let v1 = k.v1_network.unwrap_or("-");
                    if k.v1 || k.v2 {
                        println!(
                            "facilitator {}: supports {} on {} (v1 {} as {v1}, v2 {})",
                            x.facilitator,
                            k.scheme,
                            k.network,
                            if k.v1 { "yes" } else { "no" },
                            if k.v2 { "yes" } else { "no" }
                        );
                    } else {
                        failures += 1;
                        println!(
                            "facilitator {}: does NOT list {} on {} in /supported; x402 payments there will fail",
                            x.facilitator, k.scheme, k.network
                        );
                    }
                }
            }
            Err(e) => {
                failures += 1;
                println!("facilitator {}: FAILED: {e}", x.facilitator);
            }
        }
    }
    if let Some(s) = &cfg.stripe {
        failures += crate::selfservice::doctor(s).await;
    }
    let base = cfg.public_base();
    for r in &cfg.routes {
        let methods = if r.methods.is_empty() {
            "ANY".to_owned()
        } else {
            r.methods.iter().map(|m| m.as_str()).collect::<Vec<_>>().join(",")
        };
        let Some(price) = r.pricing.price() else {
            println!("route {}: {methods} {} is free", r.name, r.path);
            continue;
        };
        println!(
            "route {}: {methods} {} costs {price} USD; without payment a client gets 402 payment_missing \
(type {base}/.well-known/tollgate/problems/payment_missing) offering: {}",
            r.name,
            r.path,
            r.accept
                .iter()
                .map(|a| match *a {
                    crate::payment::rails::credits::NAME => {
                        format!("credits ({}: Bearer <key>)", cfg.credits.header_display)
                    }
                    crate::payment::rails::x402::NAME => match &cfg.x402 {
                        Some(x) => format!(
                            "x402 (exact, {} atomic units of {} on {} to {})",
                            price.get(),
                            x.primary.asset_text,
                            x.primary.network,
                            x.primary.pay_to_text
                        ),
                        None => "x402".to_owned(),
                    },
                    other => other.to_owned(),
                })
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if failures == 0 {
        println!("doctor: all checks passed");
        ExitCode::SUCCESS
    } else {
        println!("doctor: {failures} check(s) failed");
        ExitCode::from(1)
    }
}
