//! The user's exclusions and inclusions and the spec's mount stubs, matched against relative
//! paths component by component (so `/tmp/cache` excludes `/tmp/cache/x` but not `/tmp/cachex`).
//!
//! Inclusions are exclusions of everything else: with `--include /workspace`, a path that is
//! neither under `/workspace` nor one of its ancestors keeps the base's version. The ancestors
//! themselves are walked (and emitted as the sandbox has them, so a new `/workspace` exists), and
//! count as having exclusions below them, so an opaque ancestor is written as explicit
//! whiteouts and the base's other paths survive.

/// Compiled `Options::exclude`, `Options::include` and `Options::skip_mount_stubs`.
pub(crate) struct Filter {
    excludes: Vec<Vec<Vec<u8>>>,
    includes: Vec<Vec<Vec<u8>>>,
    stubs: Vec<Vec<Vec<u8>>>,
}

fn components(path: &[u8]) -> Vec<Vec<u8>> {
    path.split(|&c| c == b'/')
        .filter(|c| !c.is_empty() && *c != b".")
        .map(<[u8]>::to_vec)
        .collect()
}

impl Filter {
    pub fn new(exclude: &[String], include: &[String], stubs: &[String]) -> Filter {
        Filter {
            excludes: exclude.iter().map(|p| components(p.as_bytes())).collect(),
            includes: include.iter().map(|p| components(p.as_bytes())).collect(),
            stubs: stubs
                .iter()
                .map(|p| components(p.as_bytes()))
                .filter(|c| !c.is_empty())
                .collect(),
        }
    }

    /// `rel` (or a directory above it) matches an exclusion, or inclusions are given and `rel`
    /// is neither under one nor above one.
    pub fn excluded(&self, rel: &[u8]) -> bool {
        let path = components(rel);
        let excluded = self
            .excludes
            .iter()
            .any(|pat| pat.len() <= path.len() && prefix_matches(pat, &path));
        excluded
            || (!self.includes.is_empty()
                && !self.under_include(&path)
                && !self.above_include(&path))
    }

    /// Some exclusion could match a path strictly below the directory `rel`: an exclusion
    /// reaching below it, or `rel` is above an inclusion (its other children are left out).
    pub fn excludes_below(&self, rel: &[u8]) -> bool {
        let path = components(rel);
        let reaching = self
            .excludes
            .iter()
            .any(|pat| pat.len() > path.len() && prefix_matches(&pat[..path.len()], &path));
        reaching || (!self.under_include(&path) && self.above_include(&path))
    }

    fn under_include(&self, path: &[Vec<u8>]) -> bool {
        self.includes
            .iter()
            .any(|inc| inc.len() <= path.len() && prefix_matches(inc, path))
    }

    /// `path` is a directory strictly above some inclusion.
    fn above_include(&self, path: &[Vec<u8>]) -> bool {
        self.includes
            .iter()
            .any(|inc| inc.len() > path.len() && prefix_matches(&inc[..path.len()], path))
    }

    /// `rel` is a mount destination.
    pub fn is_stub(&self, rel: &[u8]) -> bool {
        let path = components(rel);
        self.stubs.contains(&path)
    }

    /// `rel` is a directory strictly above some mount destination.
    pub fn holds_stub(&self, rel: &[u8]) -> bool {
        let path = components(rel);
        self.stubs
            .iter()
            .any(|s| s.len() > path.len() && s[..path.len()] == path[..])
    }
}

fn prefix_matches(pat: &[Vec<u8>], path: &[Vec<u8>]) -> bool {
    pat.iter().zip(path).all(|(p, c)| glob(p, c))
}

/// `*` (any run of bytes) and `?` (one byte) within one component; everything else literal.
fn glob(pat: &[u8], s: &[u8]) -> bool {
    let (mut p, mut i) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while i < s.len() {
        if p < pat.len() && (pat[p] == b'?' || pat[p] == s[i]) && pat[p] != b'*' {
            p += 1;
            i += 1;
        } else if p < pat.len() && pat[p] == b'*' {
            star = Some((p, i));
            p += 1;
        } else if let Some((sp, si)) = star {
            p = sp + 1;
            i = si + 1;
            star = Some((sp, si + 1));
        } else {
            return false;
        }
    }
    pat[p..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclusion_matches_path_and_below_but_not_siblings_with_same_prefix() {
        let f = Filter::new(&["/tmp/cache".into(), "/var/log/*.log".into()], &[], &[]);
        assert!(f.excluded(b"tmp/cache"));
        assert!(f.excluded(b"tmp/cache/a/b"));
        assert!(!f.excluded(b"tmp/cachex"));
        assert!(!f.excluded(b"tmp"));
        assert!(f.excludes_below(b"tmp"));
        assert!(!f.excludes_below(b"etc"));
        assert!(f.excluded(b"var/log/a.log"));
        assert!(!f.excluded(b"var/log/a.txt"));
        assert!(f.excludes_below(b"var/log"));
    }

    #[test]
    fn an_inclusion_leaves_out_everything_but_its_subtree_and_its_ancestors() {
        let f = Filter::new(&["/home/u/ws/cache".into()], &["/home/u/ws".into()], &[]);
        // The included subtree, minus an exclusion inside it.
        assert!(!f.excluded(b"home/u/ws"));
        assert!(!f.excluded(b"home/u/ws/src/main.rs"));
        assert!(f.excluded(b"home/u/ws/cache/x"));
        // Ancestors are walked, and everything else below them keeps the base's version.
        assert!(!f.excluded(b"home"));
        assert!(!f.excluded(b"home/u"));
        assert!(f.excluded(b"home/u/.bashrc"));
        assert!(f.excludes_below(b"home") && f.excludes_below(b"home/u"));
        // Elsewhere: left out.
        assert!(f.excluded(b"etc/passwd") && f.excluded(b"etc"));
        assert!(
            f.excludes_below(b"home/u/ws"),
            "the exclusion inside it still counts"
        );
        assert!(!f.excludes_below(b"home/u/ws/src"));
    }

    #[test]
    fn without_inclusions_nothing_is_left_out_but_exclusions() {
        let f = Filter::new(&[], &[], &[]);
        assert!(!f.excluded(b"etc/passwd"));
        assert!(!f.excludes_below(b""));
    }

    #[test]
    fn glob_handles_stars_and_question_marks() {
        assert!(glob(b"*", b""));
        assert!(glob(b"a*b*c", b"aXXbYc"));
        assert!(!glob(b"a*b*c", b"aXXbY"));
        assert!(glob(b"?x", b"ax"));
        assert!(!glob(b"?x", b"x"));
    }

    #[test]
    fn stubs_and_their_parents() {
        let f = Filter::new(
            &[],
            &[],
            &[
                "/run/secrets/kubernetes.io/serviceaccount".into(),
                "/etc/hosts".into(),
            ],
        );
        assert!(f.is_stub(b"etc/hosts"));
        assert!(f.holds_stub(b"run/secrets"));
        assert!(!f.holds_stub(b"run/secrets/kubernetes.io/serviceaccount"));
        assert!(!f.is_stub(b"etc"));
    }
}
