//! No import circles between the modules of gateway/src: a circle means two modules cannot be
//! understood, tested or changed apart, so this test fails on the first one it finds.
//!
//! It reads every source file, collects the `crate::` and `super::` paths it names (in `use`
//! and inline, braces expanded; comments, strings and test-only modules skipped), maps each to
//! the deepest module that exists, and looks for cycles twice: between files (a module and
//! its own ancestors or descendants excepted — `super::X` and re-exports are how a module
//! tree speaks), and between the crate's top-level modules.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Graph = BTreeMap<String, BTreeSet<String>>;

fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    if parts.first().map(String::as_str) == Some("bin") {
        return None;
    }
    let last = parts.pop()?;
    let stem = last.strip_suffix(".rs")?;
    if stem != "mod" && stem != "lib" {
        parts.push(stem.to_string());
    }
    Some(parts.join("::"))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The source without comments, string and char literals (their insides become spaces).
fn code_only(s: &str) -> String {
    let b: Vec<char> = s.chars().collect();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let next = b.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < b.len() && b[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < b.len() {
                if b[i] == '/' && b.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if b[i] == '*' && b.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if c == 'r' && (next == Some('"') || next == Some('#')) && !prev_ident(&b, i) {
            // A raw string: r"..." or r#"..."#.
            let mut j = i + 1;
            let mut hashes = 0;
            while b.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if b.get(j) != Some(&'"') {
                out.push(c);
                i += 1;
                continue;
            }
            j += 1;
            'raw: while j < b.len() {
                if b[j] == '"' && (0..hashes).all(|k| b.get(j + 1 + k) == Some(&'#')) {
                    j += 1 + hashes;
                    break 'raw;
                }
                j += 1;
            }
            out.push(' ');
            i = j;
        } else if c == '"' {
            i += 1;
            while i < b.len() && b[i] != '"' {
                if b[i] == '\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
            out.push(' ');
        } else if c == '\'' && b.get(i + 2) == Some(&'\'') {
            i += 3; // a char literal such as ':'
            out.push(' ');
        } else if c == '\'' && next == Some('\\') {
            i += 2;
            while i < b.len() && b[i] != '\'' {
                i += 1;
            }
            i += 1;
            out.push(' ');
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

fn prev_ident(b: &[char], i: usize) -> bool {
    i > 0 && (b[i - 1].is_alphanumeric() || b[i - 1] == '_')
}

/// Removes `#[cfg(test)] mod x { ... }` bodies; returns the names of `#[cfg(test)] mod x;`.
fn strip_test_modules(code: &str) -> (String, Vec<String>) {
    let mut out = String::new();
    let mut test_files = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let after = rest[at + "#[cfg(test)]".len()..].trim_start();
        let Some(m) = after
            .strip_prefix("mod ")
            .or_else(|| after.strip_prefix("pub(crate) mod "))
        else {
            rest = &rest[at + 1..];
            continue;
        };
        let name: String = m
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        let tail = m[name.len()..].trim_start();
        if let Some(t) = tail.strip_prefix(';') {
            test_files.push(name);
            rest = t;
        } else if let Some(t) = tail.strip_prefix('{') {
            let mut depth = 1;
            let mut end = t.len();
            for (i, c) in t.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            end = i + 1;
                            break;
                        }
                    }
                    _ => {}
                }
            }
            rest = &t[end..];
        } else {
            rest = &rest[at + 1..];
        }
    }
    out.push_str(rest);
    (out, test_files)
}

/// Every path beginning with `crate::` or `super::`, braces expanded, as segments.
fn paths(code: &str) -> Vec<Vec<String>> {
    let chars: Vec<char> = code.chars().collect();
    let mut found = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let starts = ["crate::", "super::"]
            .iter()
            .find(|p| chars[i..].iter().take(p.len()).copied().eq(p.chars()));
        if let Some(p) = starts
            && !prev_ident(&chars, i)
        {
            let (mut ps, end) = parse_tree(&chars, i);
            let _ = p;
            found.append(&mut ps);
            i = end.max(i + 1);
        } else {
            i += 1;
        }
    }
    found
}

/// Parses `a::b::{c, d::e}` from `i`; returns each full path and where it ended.
fn parse_tree(c: &[char], mut i: usize) -> (Vec<Vec<String>>, usize) {
    let mut prefix = Vec::new();
    loop {
        while c.get(i).is_some_and(|x| x.is_whitespace()) {
            i += 1;
        }
        if c.get(i) == Some(&'{') {
            i += 1;
            let mut all = Vec::new();
            loop {
                while c.get(i).is_some_and(|x| x.is_whitespace() || *x == ',') {
                    i += 1;
                }
                if c.get(i) == Some(&'}') || i >= c.len() {
                    i += 1;
                    break;
                }
                let (sub, end) = parse_tree(c, i);
                for s in sub {
                    let mut p = prefix.clone();
                    p.extend(s);
                    all.push(p);
                }
                i = end;
            }
            return (all, i);
        }
        let start = i;
        while c.get(i).is_some_and(|x| x.is_alphanumeric() || *x == '_') {
            i += 1;
        }
        if start == i {
            break;
        }
        prefix.push(c[start..i].iter().collect());
        if c.get(i) == Some(&':') && c.get(i + 1) == Some(&':') {
            i += 2;
        } else {
            break;
        }
    }
    (vec![prefix], i)
}

fn resolve(from: &str, path: &[String], modules: &BTreeSet<String>) -> Option<String> {
    let mut base: Vec<String> = if from.is_empty() {
        Vec::new()
    } else {
        from.split("::").map(String::from).collect()
    };
    let mut segs = path.iter().peekable();
    match segs.peek().map(|s| s.as_str()) {
        Some("crate") => {
            base.clear();
            segs.next();
        }
        Some("super") => {
            while segs.peek().map(|s| s.as_str()) == Some("super") {
                segs.next();
                base.pop();
            }
        }
        _ => return None,
    }
    let mut best = None;
    let mut cur = base;
    for s in segs {
        if s == "self" {
            continue;
        }
        cur.push(s.clone());
        let m = cur.join("::");
        if modules.contains(&m) {
            best = Some(m);
        } else {
            break;
        }
    }
    best
}

fn related(a: &str, b: &str) -> bool {
    a.is_empty()
        || b.is_empty()
        || a == b
        || a.starts_with(&format!("{b}::"))
        || b.starts_with(&format!("{a}::"))
}

/// A cycle in `g`, as a list of nodes with the first repeated last.
fn find_cycle(g: &Graph) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        g: &Graph,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(n.to_string(), 1);
        stack.push(n.to_string());
        for m in g.get(n).into_iter().flatten() {
            match state.get(m).copied().unwrap_or(0) {
                1 => {
                    let at = stack.iter().position(|s| s == m).unwrap_or(0);
                    let mut cycle = stack[at..].to_vec();
                    cycle.push(m.clone());
                    return Some(cycle);
                }
                0 => {
                    if let Some(c) = visit(m, g, state, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(n.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in g.keys() {
        if state.get(n).copied().unwrap_or(0) == 0
            && let Some(c) = visit(n, g, &mut state, &mut Vec::new())
        {
            return Some(c);
        }
    }
    None
}

/// The file-level and top-level graphs of the crate under `src`.
fn graphs(src: &Path) -> (Graph, Graph) {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut sources = BTreeMap::new();
    let mut test_only = BTreeSet::new();
    for f in &files {
        let Some(m) = module_of(src, f) else { continue };
        let text = std::fs::read_to_string(f).unwrap_or_default();
        let (code, tests) = strip_test_modules(&code_only(&text));
        for t in tests {
            test_only.insert(if m.is_empty() { t } else { format!("{m}::{t}") });
        }
        sources.insert(m, code);
    }
    let modules: BTreeSet<String> = sources.keys().cloned().collect();
    let mut files_graph = Graph::new();
    let mut top = Graph::new();
    for (m, code) in &sources {
        if test_only
            .iter()
            .any(|t| m == t || m.starts_with(&format!("{t}::")))
        {
            continue;
        }
        for p in paths(code) {
            let Some(target) = resolve(m, &p, &modules) else {
                continue;
            };
            if !related(m, &target) {
                files_graph
                    .entry(m.clone())
                    .or_default()
                    .insert(target.clone());
            }
            let (a, b) = (
                m.split("::").next().unwrap_or_default(),
                target.split("::").next().unwrap_or_default(),
            );
            if !a.is_empty() && !b.is_empty() && a != b {
                top.entry(a.to_string()).or_default().insert(b.to_string());
            }
        }
    }
    (files_graph, top)
}

/// Every set of modules that reach each other (Tarjan's strongly connected components).
fn circles(g: &Graph) -> Vec<Vec<String>> {
    struct T<'g> {
        g: &'g Graph,
        index: BTreeMap<String, usize>,
        low: BTreeMap<String, usize>,
        stack: Vec<String>,
        on: BTreeSet<String>,
        out: Vec<Vec<String>>,
    }
    fn strong(t: &mut T<'_>, v: &str) {
        let i = t.index.len();
        t.index.insert(v.into(), i);
        t.low.insert(v.into(), i);
        t.stack.push(v.into());
        t.on.insert(v.into());
        for w in t.g.get(v).into_iter().flatten() {
            if !t.index.contains_key(w) {
                strong(t, w);
                let lw = t.low[w];
                let lv = t.low[v];
                t.low.insert(v.into(), lv.min(lw));
            } else if t.on.contains(w) {
                let iw = t.index[w];
                let lv = t.low[v];
                t.low.insert(v.into(), lv.min(iw));
            }
        }
        if t.low[v] == t.index[v] {
            let mut comp = Vec::new();
            while let Some(w) = t.stack.pop() {
                t.on.remove(&w);
                let done = w == v;
                comp.push(w);
                if done {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                t.out.push(comp);
            }
        }
    }
    let mut t = T {
        g,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in g.keys() {
        if !t.index.contains_key(v) {
            strong(&mut t, v);
        }
    }
    t.out
}

#[test]
fn no_import_circles_between_modules() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let (files, top) = graphs(&src);
    assert!(files.len() > 10, "the source tree was not read: {src:?}");
    if let Some(c) = find_cycle(&files) {
        panic!(
            "import circle between modules: {} (all circles: {:?})",
            c.join(" -> "),
            circles(&files)
        );
    }
    if let Some(c) = find_cycle(&top) {
        panic!(
            "import circle between top-level modules: {}",
            c.join(" -> ")
        );
    }
}

#[test]
fn the_checker_sees_a_circle_when_there_is_one() {
    let dir = std::env::temp_dir().join(format!("gateway-modgraph-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("a")).expect("dir");
    let write = |p: &str, s: &str| std::fs::write(dir.join(p), s).expect("write");
    write("lib.rs", "pub mod a;\npub mod b;\n");
    write(
        "a/mod.rs",
        "pub mod x;\npub mod y;\nuse super::b::thing; // crate::b::c in a comment\n",
    );
    write(
        "a/x.rs",
        "use super::{y::Y, super::b};\nconst S: &str = \"crate::b\";\n#[cfg(test)]\nmod tests { use crate::b::thing; }\n",
    );
    write("a/y.rs", "pub struct Y;\n");
    write("b.rs", "pub fn thing() { crate::a::y::Y; }\n");
    let (files, top) = graphs(&dir);
    assert_eq!(find_cycle(&files), None, "{files:?}");
    assert_eq!(
        find_cycle(&top),
        Some(vec!["a".into(), "b".into(), "a".into()]),
        "{top:?}"
    );
    write("a/y.rs", "pub struct Y;\nfn f() { crate::a::x::g(); }\n");
    write("a/x.rs", "pub fn g() { super::y::Y; }\n");
    let (files, _) = graphs(&dir);
    let c = find_cycle(&files).expect("a circle between x and y");
    assert!(c.contains(&"a::x".to_string()) && c.contains(&"a::y".to_string()));
    let _ = std::fs::remove_dir_all(&dir);
}
