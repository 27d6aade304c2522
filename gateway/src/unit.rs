//! What gatewayd and its systemd unit must agree on. The unit makes only its
//! `RuntimeDirectory=` (the socket) and `StateDirectory=` (the crash record) writable and tells
//! the daemon where they are (`RUNTIME_DIRECTORY`, `STATE_DIRECTORY`); a socket or state
//! directory configured elsewhere would fail on a read-only file system after setup began. The
//! check names the key and the value to set instead, as a config error, which the unit does not
//! restart on — the usual slip with the template unit `gatewayd@.service`, whose instances get
//! `/run/gateway-NAME` and `/var/lib/gateway-NAME`.

use std::path::{Path, PathBuf};

use crate::config::{Config, ConfigIssue};

/// Checks `config` against the directories systemd gave this process, if it did.
pub fn check_dirs(
    config: &Config,
    runtime_dirs: Option<&str>,
    state_dirs: Option<&str>,
) -> Vec<ConfigIssue> {
    let mut issues = Vec::new();
    let mut check = |key: &str,
                     path: &Path,
                     dirs: Option<&str>,
                     suggest: &dyn Fn(&Path) -> PathBuf| {
        let Some(dirs) = dirs.filter(|d| !d.is_empty()) else {
            return;
        };
        let dirs: Vec<&Path> = dirs.split(':').map(Path::new).collect();
        if dirs.iter().any(|d| path.starts_with(d)) {
            return;
        }
        issues.push(ConfigIssue {
            file: config.path.clone(),
            key: key.into(),
            reason: format!(
                "{} is outside the directory the systemd unit lets gatewayd write ({}); set {} = {:?}",
                path.display(),
                dirs[0].display(),
                key.rsplit('.').next().unwrap_or(key),
                suggest(dirs[0]).display().to_string()
            ),
        });
    };
    let socket_name = config
        .node
        .socket
        .file_name()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("gatewayd.sock"));
    check(
        "node.socket",
        &config.node.socket,
        runtime_dirs,
        &|d: &Path| d.join(&socket_name),
    );
    check(
        "node.state_dir",
        &config.node.state_dir,
        state_dirs,
        &|d: &Path| d.to_path_buf(),
    );
    issues
}

/// [`check_dirs`] with the directories from this process's environment.
pub fn check_dirs_from_env(config: &Config) -> Vec<ConfigIssue> {
    let runtime = std::env::var("RUNTIME_DIRECTORY").ok();
    let state = std::env::var("STATE_DIRECTORY").ok();
    check_dirs(config, runtime.as_deref(), state.as_deref())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(node: &str) -> Config {
        crate::config::parse(Path::new("/etc/gateway/vpc2.toml"), node)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn defaults_fit_the_shipped_unit_and_nothing_is_checked_outside_systemd() {
        let c = config("[node]\nname = \"n\"\n");
        assert!(check_dirs(&c, Some("/run/gateway"), Some("/var/lib/gateway")).is_empty());
        assert!(check_dirs(&c, None, None).is_empty());
    }

    #[test]
    fn an_instance_config_with_the_default_paths_is_told_what_to_set() {
        let c = config("[node]\nname = \"n\"\n");
        let issues = check_dirs(&c, Some("/run/gateway-vpc2"), Some("/var/lib/gateway-vpc2"));
        let keys: Vec<&str> = issues.iter().map(|i| i.key.as_str()).collect();
        assert_eq!(keys, ["node.socket", "node.state_dir"]);
        assert!(
            issues[0]
                .reason
                .ends_with("set socket = \"/run/gateway-vpc2/gatewayd.sock\""),
            "{}",
            issues[0]
        );
        assert!(
            issues[1]
                .reason
                .ends_with("set state_dir = \"/var/lib/gateway-vpc2\""),
            "{}",
            issues[1]
        );
        let fixed = config(
            "[node]\nname = \"n\"\nsocket = \"/run/gateway-vpc2/gatewayd.sock\"\n\
             state_dir = \"/var/lib/gateway-vpc2\"\n",
        );
        assert!(
            check_dirs(
                &fixed,
                Some("/run/gateway-vpc2"),
                Some("/var/lib/gateway-vpc2")
            )
            .is_empty()
        );
    }
}
