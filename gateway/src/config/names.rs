//! The naming rules the sections share: node, interface and nftables table names, checked
//! as the kernel and nftables would check them, so a bad name is refused before start.

/// The daemon's nftables table when the config names none: one per node name.
pub(super) fn default_table(node_name: &str) -> String {
    format!("gateway_{}", node_name.replace(['-', '.'], "_"))
}

pub(super) fn check_table_name(table: &str) -> Result<(), String> {
    if table.is_empty()
        || table.len() > 64
        || !table.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    {
        return Err(format!("{table:?}: use 1-64 letters, digits and '_'"));
    }
    Ok(())
}

pub(super) fn check_node_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 64 {
        return Err(format!(
            "must be 1 to 64 characters, got {} characters",
            name.len()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!(
            "{name:?} contains {c:?}; use letters, digits, '-', '_' and '.'"
        ));
    }
    Ok(())
}

/// The kernel's own rules for interface names (IFNAMSIZ and dev_valid_name()).
pub(super) fn check_interface_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 15 {
        return Err(format!(
            "{name:?} is not a valid interface name (1 to 15 bytes)"
        ));
    }
    if name == "."
        || name == ".."
        || name.contains(['/', ':'])
        || name.contains(char::is_whitespace)
    {
        return Err(format!(
            "{name:?} is not a valid interface name (no '/', ':' or spaces)"
        ));
    }
    Ok(())
}
