//! gatewayd: the daemon. Argument parsing and logging setup, then the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// Exit status for a config that does not validate; the systemd unit does not restart on it,
/// since restarting cannot fix a file.
const EXIT_BAD_CONFIG: u8 = 2;

#[derive(Parser)]
#[command(
    version,
    about = "gateway daemon: classifies traffic with eBPF and serves status"
)]
struct Args {
    /// Config file (TOML).
    #[arg(long, default_value = "/etc/gateway/gateway.toml")]
    config: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();

    let config = match gateway::config::load(&args.config)
        .and_then(|c| gateway::config::check_system(&c).map(|()| c))
    {
        Ok(c) => c,
        Err(e) => {
            for issue in &e.0 {
                eprintln!("gatewayd: invalid config: {issue}");
            }
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    gateway::logging::init(&config.node.log_level);
    for warning in &config.warnings {
        tracing::warn!("config: {warning}");
    }

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
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
