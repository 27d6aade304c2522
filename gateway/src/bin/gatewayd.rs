//! gatewayd: the daemon. Argument parsing and logging setup, then the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "gatewayd",
    version,
    about = "gateway daemon: classifies traffic with eBPF and serves status"
)]
struct Args {
    /// Config file (TOML).
    #[arg(long, default_value = "/etc/gateway/gateway.toml")]
    config: PathBuf,
    /// Write shell completions and man pages into DIR and exit (packaging).
    #[arg(long, value_name = "DIR", hide = true)]
    write_assets: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(dir) = &args.write_assets {
        use clap::CommandFactory;
        return match gateway::assets::write(Args::command(), "8", dir) {
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("gatewayd: writing to {}: {e}", dir.display());
                ExitCode::FAILURE
            }
        };
    }

    // A config that does not validate exits with EXIT_BAD_CONFIG, which the unit does not
    // restart on: restarting cannot fix a file.
    let config = match gateway::config::load(&args.config)
        .and_then(|c| gateway::preflight::check_system(&c).map(|()| c))
        .and_then(|c| match gateway::unit::check_dirs_from_env(&c) {
            issues if issues.is_empty() => Ok(c),
            issues => Err(gateway::config::ConfigError(issues)),
        }) {
        Ok(c) => c,
        Err(e) => {
            for issue in &e.0 {
                eprintln!("gatewayd: invalid config: {issue}");
            }
            return ExitCode::from(gateway::config::EXIT_BAD_CONFIG);
        }
    };
    gateway::logging::init(&config.node.log_level);
    for warning in &config.warnings {
        tracing::warn!("config: {warning}");
    }

    let runtime = match runtime_for(&config).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("gatewayd: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(gateway::daemon::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("gatewayd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A client carries one tunnel: on one thread a packet goes from socket to QUIC to TUN without
/// waking another thread (each wake-up costs a context switch, the larger part of a ping's
/// time through the tunnel). A connector or a hub serves many peers at once: two workers.
fn runtime_for(config: &gateway::config::Config) -> tokio::runtime::Builder {
    use gateway::config::Role;
    match config.tunnel.as_ref().map(|t| &t.role) {
        Some(Role::Client { .. }) => tokio::runtime::Builder::new_current_thread(),
        _ => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(2);
            b
        }
    }
}
