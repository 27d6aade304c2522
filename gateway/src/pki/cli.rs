//! `gatewayctl pki ...`: the subcommands' arguments and what each prints. Kept beside the CA
//! code so gatewayctl only routes to it.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use super::crl::{self, Reason};
use super::{DEFAULT_DAYS, IssueOptions, PkiError, Profile, list};

#[derive(Debug, clap::Subcommand)]
pub enum PkiCommand {
    /// Create DIR/ca.pem, DIR/ca.key (0600) and an empty DIR/crl.pem; never overwrites.
    Init {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Issue DIR/NAME.pem and DIR/NAME.key (0600) signed by DIR's CA; NAME is the identity.
    Issue {
        /// The identity: a lowercase DNS name, at most 64 characters (also its first DNS SAN).
        name: String,
        #[arg(long)]
        dir: PathBuf,
        /// client: ClientAuth only; connector: ServerAuth and ClientAuth (accepts clients,
        /// may dial out to a hub); hub: ServerAuth only.
        #[arg(long, value_enum, default_value_t = Profile::Client)]
        profile: Profile,
        /// Lifetime in days (1-3650; not beyond the CA's own expiry).
        #[arg(long, default_value_t = DEFAULT_DAYS)]
        days: u32,
        /// Another DNS name clients dial this node by (repeatable): a client whose connect
        /// target is gw.example.net needs no server_name if the connector's certificate has it.
        #[arg(long = "dns", value_name = "HOST")]
        dns: Vec<String>,
        /// An IP address clients dial this node at (repeatable), for `connect = ["IP:PORT"]`
        /// without server_name.
        #[arg(long = "ip", value_name = "ADDR")]
        ip: Vec<IpAddr>,
    },
    /// New key and certificate for NAME with its profile and names; the old pair moves to
    /// DIR/old/NAME.SERIAL.pem and .key.
    Renew {
        name: String,
        #[arg(long)]
        dir: PathBuf,
        /// Change the profile (default: keep the current certificate's).
        #[arg(long, value_enum)]
        profile: Option<Profile>,
        #[arg(long, default_value_t = DEFAULT_DAYS)]
        days: u32,
    },
    /// Add every certificate of NAME (renewed ones too) to DIR/crl.pem, keeping earlier
    /// revocations. Copy crl.pem to the nodes' [tls] crl and reload them (SIGHUP).
    Revoke {
        name: String,
        #[arg(long)]
        dir: PathBuf,
        /// Only this certificate of NAME (hexadecimal, as pki list shows it): the one a
        /// renewal replaced, say.
        #[arg(long, value_name = "HEX")]
        serial: Option<String>,
        /// Recorded in the CRL and shown by status when a session is closed for it.
        #[arg(long, value_enum)]
        reason: Option<Reason>,
    },
    /// Sign DIR/crl.pem again with what it lists (creates an empty one for a CA made before
    /// pki init wrote it).
    Crl {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Every certificate in DIR: profile, names, serial, expiry, revoked; warns within 30 days
    /// of expiry.
    List {
        #[arg(long)]
        dir: PathBuf,
    },
}

/// Runs one `pki` subcommand; errors go to stderr as `gatewayctl: pki: ...`.
pub fn run(command: PkiCommand) -> ExitCode {
    match execute(command) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("gatewayctl: pki: {e}");
            ExitCode::FAILURE
        }
    }
}

fn execute(command: PkiCommand) -> Result<String, PkiError> {
    let now = time::OffsetDateTime::now_utc();
    match command {
        PkiCommand::Init { dir } => {
            let (cert, key) = super::init(&dir)?;
            Ok(format!(
                "wrote {}\nwrote {} (mode 0600)\nwrote {} (no certificate revoked yet)\n",
                cert.display(),
                key.display(),
                crl::path(&dir).display()
            ))
        }
        PkiCommand::Issue {
            name,
            dir,
            profile,
            days,
            dns,
            ip,
        } => {
            let opts = IssueOptions {
                profile,
                days,
                dns,
                ips: ip,
            };
            let i = super::issue(&dir, &name, &opts)?;
            Ok(format!(
                "wrote {}\nwrote {} (mode 0600)\n{}\n",
                i.cert.display(),
                i.key.display(),
                describe(&i.info)
            ))
        }
        PkiCommand::Renew {
            name,
            dir,
            profile,
            days,
        } => {
            let r = super::renew(&dir, &name, profile, days)?;
            let mut out = format!("moved the old certificate to {}\n", r.old_cert.display());
            if let Some(k) = &r.old_key {
                out.push_str(&format!("moved the old key to {}\n", k.display()));
            }
            out.push_str(&format!(
                "wrote {}\nwrote {} (mode 0600)\n{}\n\
                 the old certificate stays valid until it expires; to retire it now: \
                 gatewayctl pki revoke {name} --serial {} --reason superseded --dir {}\n",
                r.issued.cert.display(),
                r.issued.key.display(),
                describe(&r.issued.info),
                r.old_serial,
                dir.display()
            ));
            Ok(out)
        }
        PkiCommand::Revoke {
            name,
            dir,
            serial,
            reason,
        } => {
            let r = crl::revoke(&dir, &name, serial.as_deref(), reason, now)?;
            let mut out = String::new();
            for c in &r.added {
                out.push_str(&format!(
                    "revoked {} serial {}\n",
                    c.identity,
                    c.serial_hex()
                ));
            }
            for c in &r.already {
                out.push_str(&format!(
                    "{} serial {} was already revoked\n",
                    c.identity,
                    c.serial_hex()
                ));
            }
            if r.added.is_empty() {
                out.push_str(&format!("{} unchanged\n", r.crl.display()));
            } else {
                out.push_str(&format!(
                    "wrote {} ({} revoked, number {})\n\
                     next: copy it to every node's [tls] crl, then reload them \
                     (systemctl reload gatewayd): sessions on a revoked certificate are closed\n",
                    r.crl.display(),
                    r.total,
                    r.number
                ));
            }
            Ok(out)
        }
        PkiCommand::Crl { dir } => {
            let (path, revoked, number) = crl::refresh(&dir, now)?;
            Ok(format!(
                "wrote {} ({revoked} revoked, number {number})\n",
                path.display()
            ))
        }
        PkiCommand::List { dir } => {
            let inv = list::inventory(&dir)?;
            Ok(list::render(&inv, now.unix_timestamp()))
        }
    }
}

fn describe(info: &super::CertInfo) -> String {
    format!(
        "{}: profile {}, names {}, serial {}, valid until {}",
        info.identity,
        info.profile_name(),
        info.sans(),
        info.serial_hex(),
        super::date(info.not_after)
    )
}
