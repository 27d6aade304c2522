//! gatewayctl: the operator CLI. Talks to gatewayd over its Unix socket.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use gateway::api::{self, ClientError, Request, Response};
use gateway::config::{self, DEFAULT_SOCKET};

/// Exit status when the daemon is not running, so scripts can tell "down" from "broken".
const EXIT_NOT_RUNNING: u8 = 3;
const DEFAULT_CONFIG: &str = "/etc/gateway/gateway.toml";

#[derive(Parser)]
#[command(name = "gatewayctl", version, about = "Operate a gateway node")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show what the daemon is doing: programs attached, routes and their counters.
    Status {
        /// Print the status as JSON (schema: docs/status.schema.json).
        #[arg(long)]
        json: bool,
        /// Daemon socket; defaults to [node] socket of --config, then /run/gateway/gatewayd.sock.
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Config file to take the socket path from.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Redraw every --interval seconds until interrupted (Ctrl-C).
        #[arg(long)]
        watch: bool,
        /// Seconds between redraws with --watch.
        #[arg(long, default_value_t = 2.0, requires = "watch", value_parser = interval_secs)]
        interval: f64,
    },
    /// Validate a config file without starting anything; exits 2 (as gatewayd would) naming
    /// file, key and reason for every problem.
    CheckConfig { file: PathBuf },
    /// Cloud firewall rules this config needs (network ACL and security group).
    Firewall {
        #[command(subcommand)]
        command: Firewall,
    },
    /// A byte stream to a VPC host through the connector, without root, TUN or routes.
    Access {
        #[command(subcommand)]
        command: Access,
    },
    /// The tunnel's private CA: create it, issue, renew, revoke and list certificates.
    Pki {
        #[command(subcommand)]
        command: gateway::pki::cli::PkiCommand,
    },
    /// Write shell completions and man pages into DIR (packaging).
    #[command(hide = true)]
    WriteAssets { dir: PathBuf },
}

#[derive(Subcommand)]
enum Firewall {
    /// Print the minimal inbound/outbound rules: a handful of ports, never 1024-65535.
    Plan {
        #[arg(long)]
        config: PathBuf,
        #[arg(long, value_enum, default_value = "table")]
        format: PlanFormat,
    },
}

#[derive(Subcommand)]
enum Access {
    /// For ssh's ProxyCommand: `ssh -o ProxyCommand='gatewayctl access ssh --hostname %h' HOST`.
    Ssh {
        /// A VPC address, or a name under one of the connector's private zones.
        #[arg(long)]
        hostname: String,
        #[arg(long, default_value_t = 22)]
        port: u16,
        /// A client config ([tunnel] connect, [tls]); default: $GATEWAY_CONFIG, then
        /// ~/.config/gateway/access.toml, then /etc/gateway/gateway.toml.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Forward a local TCP port to HOST:PORT, one stream per connection.
    Tcp {
        #[arg(long)]
        listen: std::net::SocketAddr,
        /// HOST:PORT, HOST an address or a private name.
        #[arg(long)]
        to: String,
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum PlanFormat {
    Table,
    AwsCli,
}

fn main() -> ExitCode {
    match Args::parse().command {
        Command::Status {
            json,
            socket,
            config,
            watch,
            interval,
        } => status(json, socket, config, watch, interval),
        Command::CheckConfig { file } => check_config(&file),
        Command::Pki { command } => gateway::pki::cli::run(command),
        Command::Access { command } => access(command),
        Command::Firewall {
            command: Firewall::Plan { config, format },
        } => firewall_plan(&config, format),
        Command::WriteAssets { dir } => {
            use clap::CommandFactory;
            match gateway::assets::write(Args::command(), "1", &dir) {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("gatewayctl: writing to {}: {e}", dir.display());
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn status(
    json: bool,
    socket: Option<PathBuf>,
    config: Option<PathBuf>,
    watch: bool,
    interval: f64,
) -> ExitCode {
    let socket = match resolve_socket(socket, config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("gatewayctl: {e}");
            return ExitCode::FAILURE;
        }
    };
    if watch {
        return watch_status(json, &socket, Duration::from_secs_f64(interval));
    }
    match fetch_status(json, &socket) {
        Ok(text) => {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
            ExitCode::SUCCESS
        }
        Err(failure) => {
            eprintln!("gatewayctl: {}", failure.message);
            failure.code
        }
    }
}

/// `--interval`: a person watching wants at most a few redraws a second, and a typo such as
/// `nan` or `-1` must be an error, not a busy loop or a panic.
fn interval_secs(s: &str) -> Result<f64, String> {
    let secs: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if (0.1..=86_400.0).contains(&secs) {
        Ok(secs)
    } else {
        Err(format!("{s} is outside 0.1..86400 seconds"))
    }
}

/// Redraws until interrupted. Each screen is fetched and rendered before the old one is
/// cleared, so a slow daemon never leaves a blank terminal; a daemon that goes away is one line
/// on the screen, and the next round asks again.
fn watch_status(json: bool, socket: &Path, interval: Duration) -> ExitCode {
    let terminal = std::io::stdout().is_terminal();
    loop {
        let mut screen = String::new();
        if terminal {
            // Home and clear: one current state, no scrolling history of old ones.
            screen.push_str("\x1b[H\x1b[2J");
            if !json {
                screen.push_str(&format!(
                    "every {}s, {} (Ctrl-C to stop)\n\n",
                    interval.as_secs_f64(),
                    utc_clock(gateway::sys::unix_now())
                ));
            }
        } else {
            // Piped: snapshots follow each other, so mark where each begins.
            screen.push_str(&format!("--- {}\n", gateway::sys::unix_now()));
        }
        match fetch_status(json, socket) {
            Ok(text) => screen.push_str(&text),
            Err(failure) => {
                let line = format!("gatewayctl: {}\n", failure.message);
                screen.push_str(&if colour() {
                    gateway::cli::colourize(&line)
                } else {
                    line
                });
            }
        }
        let mut out = std::io::stdout().lock();
        if out
            .write_all(screen.as_bytes())
            .and_then(|()| out.flush())
            .is_err()
        {
            // The reader went away (`| head`): nothing more to show anyone.
            return ExitCode::SUCCESS;
        }
        drop(out);
        std::thread::sleep(interval);
    }
}

/// `HH:MM:SS UTC`: enough to see that the screen is live, without a time-zone database.
fn utc_clock(unix: u64) -> String {
    let day = unix % 86_400;
    format!("{:02}:{:02}:{:02} UTC", day / 3600, day / 60 % 60, day % 60)
}

/// Why there is no status to show: the one line for the operator, and the exit status that
/// lets scripts tell "not running" (3) from "broken" (1).
struct Failure {
    message: String,
    code: ExitCode,
}

/// The status as it is printed: JSON, or the human text, coloured when stdout takes colour.
fn fetch_status(json: bool, socket: &Path) -> Result<String, Failure> {
    let failed = |message: String| Failure {
        message,
        code: ExitCode::FAILURE,
    };
    let s = match api::request(socket, &Request::Status, Duration::from_secs(5)) {
        Ok(Response::Status(s)) => s,
        Ok(Response::Error { message }) => {
            return Err(failed(format!("gatewayd reported an error: {message}")));
        }
        Err(e @ ClientError::NotRunning { .. }) => {
            return Err(Failure {
                message: e.to_string(),
                code: ExitCode::from(EXIT_NOT_RUNNING),
            });
        }
        Err(e) => return Err(failed(e.to_string())),
    };
    if json {
        return serde_json::to_string_pretty(&s)
            .map(|text| text + "\n")
            .map_err(|e| failed(format!("encoding status: {e}")));
    }
    let text = gateway::cli::render_status(&s);
    Ok(if colour() {
        gateway::cli::colourize(&text)
    } else {
        text
    })
}

/// Whether stdout takes colour: a terminal, unless NO_COLOR (or CLICOLOR=0, TERM=dumb) says
/// otherwise; CLICOLOR_FORCE forces it. As anstream judges them.
fn colour() -> bool {
    anstream::AutoStream::choice(&std::io::stdout()) != anstream::ColorChoice::Never
}

/// --socket wins; then the socket of an explicitly named config (which must be valid); then
/// that of the default config if it exists and parses; then the built-in default.
fn resolve_socket(socket: Option<PathBuf>, config: Option<PathBuf>) -> Result<PathBuf, String> {
    if let Some(s) = socket {
        return Ok(s);
    }
    if let Some(path) = config {
        return config::load(&path)
            .map(|c| c.node.socket)
            .map_err(|e| format!("invalid config:\n{e}"));
    }
    let default = Path::new(DEFAULT_CONFIG);
    if default.exists()
        && let Ok(c) = config::load(default)
    {
        return Ok(c.node.socket);
    }
    Ok(PathBuf::from(DEFAULT_SOCKET))
}

fn check_config(file: &Path) -> ExitCode {
    let checked = config::load(file).and_then(|c| gateway::preflight::check_system(&c).map(|()| c));
    match checked {
        Ok(c) => {
            // Warnings leave the config valid: they are shown, and the exit status stays 0.
            for warning in &c.warnings {
                eprintln!("gatewayctl: warning: {warning}");
            }
            println!(
                "{}: ok (node {}, {} interface(s), {} route(s), {} warning(s))",
                file.display(),
                c.node.name,
                c.interfaces.len(),
                c.routes.len(),
                c.warnings.len()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            for issue in &e.0 {
                eprintln!("gatewayctl: invalid config: {issue}");
            }
            // The status gatewayd exits with for the same file.
            ExitCode::from(config::EXIT_BAD_CONFIG)
        }
    }
}

fn firewall_plan(path: &Path, format: PlanFormat) -> ExitCode {
    let config = match config::load(path) {
        Ok(c) => c,
        Err(e) => {
            for issue in &e.0 {
                eprintln!("gatewayctl: invalid config: {issue}");
            }
            return ExitCode::FAILURE;
        }
    };
    match gateway::plan::plan(&config) {
        Ok(rules) => {
            print!(
                "{}",
                match format {
                    PlanFormat::Table => gateway::plan::render_table(&rules),
                    PlanFormat::AwsCli => gateway::plan::render_aws_cli(&rules),
                }
            );
            if let Some(filter) = gateway::plan::host_forward_filter(&config) {
                match format {
                    PlanFormat::Table => print!("{filter}"),
                    PlanFormat::AwsCli => filter.lines().for_each(|l| println!("# {l}")),
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("gatewayctl: firewall plan: {}: {e}", path.display());
            ExitCode::FAILURE
        }
    }
}

/// The config `access` reads: only its [tunnel] and [tls] matter.
fn access_config(explicit: Option<PathBuf>) -> Result<config::Tunnel, String> {
    let path = explicit
        .or_else(|| std::env::var_os("GATEWAY_CONFIG").map(PathBuf::from))
        .or_else(|| {
            let home = std::env::var_os("XDG_CONFIG_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".config")))?;
            let p = home.join("gateway/access.toml");
            p.exists().then_some(p)
        })
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG));
    let c = config::load(&path).map_err(|e| format!("invalid config:\n{e}"))?;
    c.tunnel.ok_or_else(|| {
        format!(
            "{}: no [tunnel]: access needs a client config",
            path.display()
        )
    })
}

fn access(command: Access) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("gatewayctl: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match command {
            Access::Ssh {
                hostname,
                port,
                config,
            } => {
                let cfg = access_config(config).map_err(anyhow::Error::msg)?;
                gateway::tunnel::access::stdio(&cfg, &hostname, port).await
            }
            Access::Tcp { listen, to, config } => {
                let cfg = access_config(config).map_err(anyhow::Error::msg)?;
                let (host, port) = to
                    .rsplit_once(':')
                    .and_then(|(h, p)| Some((h.trim_matches(['[', ']']), p.parse::<u16>().ok()?)))
                    .filter(|(h, p)| !h.is_empty() && *p != 0)
                    .ok_or_else(|| anyhow::anyhow!("--to {to:?} is not HOST:PORT"))?;
                gateway::tunnel::access::forward(cfg, listen, host.to_string(), port).await
            }
        }
    });
    // Stdin may still be read by a blocking thread; do not wait for it.
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gatewayctl: access: {e:#}");
            ExitCode::FAILURE
        }
    }
}
