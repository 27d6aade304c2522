//! Shell completions and man pages, generated from the binaries' own clap definitions so that
//! they cannot drift from them. `cargo xtask deb` asks each built binary for them (a hidden
//! option, `gatewayd --write-assets DIR` and `gatewayctl write-assets DIR`) and packages them.

use std::io;
use std::path::{Path, PathBuf};

use clap::Command;
use clap_complete::Shell;

/// Writes into `out`: `completions/bash/NAME`, `completions/zsh/_NAME`,
/// `completions/fish/NAME.fish`, and under `man/` the page `NAME.SECTION` with one more per
/// visible subcommand (`NAME-SUB.SECTION`). Returns the files written.
pub fn write(cmd: Command, section: &str, out: &Path) -> io::Result<Vec<PathBuf>> {
    let name = cmd.get_name().to_string();
    // Pages for `help` and `help SUB` would say nothing new.
    let mut man_cmd = cmd.clone().disable_help_subcommand(true);
    let mut cmd = visible(&cmd);
    let mut written = Vec::new();
    for (shell, dir, file) in [
        (Shell::Bash, "bash", name.clone()),
        (Shell::Zsh, "zsh", format!("_{name}")),
        (Shell::Fish, "fish", format!("{name}.fish")),
    ] {
        let dir = out.join("completions").join(dir);
        std::fs::create_dir_all(&dir)?;
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut cmd, &name, &mut script);
        let path = dir.join(file);
        std::fs::write(&path, script)?;
        written.push(path);
    }
    let man = out.join("man");
    std::fs::create_dir_all(&man)?;
    man_cmd.build();
    man_pages(man_cmd, section, &man, &mut written)?;
    Ok(written)
}

/// `cmd` without what is hidden from help, which completions would otherwise offer.
fn visible(cmd: &Command) -> Command {
    let mut out = Command::new(cmd.get_name().to_string())
        .args(cmd.get_arguments().filter(|a| !a.is_hide_set()).cloned())
        .subcommands(
            cmd.get_subcommands()
                .filter(|s| !s.is_hide_set())
                .map(visible),
        );
    if let Some(v) = cmd.get_version() {
        out = out.version(v.to_string());
    }
    if let Some(a) = cmd.get_about() {
        out = out.about(a.clone());
    }
    out
}

/// A page for `cmd` and, depth first, for each of its visible subcommands.
fn man_pages(
    cmd: Command,
    section: &str,
    dir: &Path,
    written: &mut Vec<PathBuf>,
) -> io::Result<()> {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        man_pages(sub.clone(), section, dir, written)?;
    }
    written.push(
        clap_mangen::Man::new(cmd)
            .section(section)
            .manual("gateway")
            .generate_to(dir)?,
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(clap::Parser)]
    #[command(name = "demo", version, about = "A demo")]
    struct Demo {
        #[command(subcommand)]
        command: Sub,
    }

    #[derive(clap::Subcommand)]
    enum Sub {
        /// Shows things.
        Show {
            #[arg(long)]
            json: bool,
        },
        #[command(hide = true)]
        Secret {
            #[arg(long, hide = true)]
            hidden_flag: bool,
        },
    }

    #[test]
    fn writes_completions_for_three_shells_and_a_page_per_visible_subcommand() {
        use clap::CommandFactory;
        let out = std::env::temp_dir().join(format!("gw-assets-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        let files = write(Demo::command(), "1", &out).expect("write");
        let names: Vec<String> = files
            .iter()
            .map(|f| {
                f.strip_prefix(&out)
                    .expect("under out")
                    .display()
                    .to_string()
            })
            .collect();
        assert_eq!(
            names,
            [
                "completions/bash/demo",
                "completions/zsh/_demo",
                "completions/fish/demo.fish",
                "man/demo-show.1",
                "man/demo.1",
            ]
        );
        let bash = std::fs::read_to_string(out.join("completions/bash/demo")).expect("bash");
        assert!(
            bash.contains("--json") && !bash.contains("secret"),
            "{bash}"
        );
        let page = std::fs::read_to_string(out.join("man/demo-show.1")).expect("page");
        assert!(
            page.contains(".TH demo-show 1") && page.contains("json"),
            "{page}"
        );
        let _ = std::fs::remove_dir_all(&out);
    }
}
