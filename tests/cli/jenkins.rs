//! `docs/Jenkinsfile` runs: every shell command in it, in order, against a
//! real `ferry serve` on 127.0.0.1 and a fake `docker`, once as a branch
//! build and once as a pull-request build (see docs/jenkins.md, "How it is
//! tested", and the conventions at the top of the Jenkinsfile).

use crate::util::*;
use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

const JENKINSFILE: &str = include_str!("../../docs/Jenkinsfile");
const JENKINS_MD: &str = include_str!("../../docs/jenkins.md");

/// Jenkins credential id → the server's `[[token]] name` (docs/jenkins.md).
const CREDENTIALS: [(&str, &str); 2] = [
    ("ferry-branch-token", "jenkins-branches"),
    ("ferry-pr-token", "jenkins-pull-requests"),
];

/// The `environment` values Jenkins computes with Groovy; the test computes
/// them the same way, from the same Jenkins variables.
const SCOPE_EXPR: &str =
    r#""${env.CHANGE_ID ? "pr/${env.CHANGE_ID}" : "ci/${env.BRANCH_NAME}"}/${env.BUILD_NUMBER}""#;
const TOKEN_ID_EXPR: &str = r#""${env.CHANGE_ID ? 'ferry-pr-token' : 'ferry-branch-token'}""#;

/// One `sh '''…'''` block and where it stands.
#[derive(Debug)]
struct Step {
    stage: String,
    label: String,
    /// `'literal'` or `env.NAME`, as written after `credentialsId:`.
    credential: String,
    body: String,
}

/// The text after the last `open` before `end`, up to `close`.
fn last_between(text: &str, open: &str, close: &str) -> Option<(usize, String)> {
    let at = text.rfind(open)?;
    let rest = &text[at + open.len()..];
    let stop = rest.find(close)?;
    Some((at, rest[..stop].to_owned()))
}

/// The Jenkinsfile's `environment` block (literal values, and the two
/// computed ones checked against what the test computes) and its steps.
fn parse(jenkinsfile: &str) -> (Vec<(String, String)>, Vec<Step>) {
    // Comment lines blanked (same length, so positions stay).
    let blanked: String = jenkinsfile
        .split_inclusive('\n')
        .map(|l| {
            if l.trim_start().starts_with("//") {
                l.chars().map(|c| if c == '\n' { c } else { ' ' }).collect()
            } else {
                l.to_owned()
            }
        })
        .collect();
    let jenkinsfile = blanked.as_str();
    let mut env = Vec::new();
    let mut in_env = false;
    for line in jenkinsfile.lines() {
        let t = line.trim();
        if t == "environment {" {
            in_env = true;
            continue;
        }
        if in_env && t == "}" {
            break;
        }
        if !in_env || t.starts_with("//") || t.is_empty() {
            continue;
        }
        let (key, value) = t
            .split_once('=')
            .unwrap_or_else(|| panic!("environment line {t:?}: KEY = VALUE"));
        let (key, value) = (key.trim(), value.trim());
        let value = match key {
            "FERRY_SCOPE" => {
                assert_eq!(value, SCOPE_EXPR, "FERRY_SCOPE changed: update the test");
                continue;
            }
            "FERRY_TOKEN_ID" => {
                assert_eq!(
                    value, TOKEN_ID_EXPR,
                    "FERRY_TOKEN_ID changed: update the test"
                );
                continue;
            }
            _ => value
                .strip_prefix('\'')
                .and_then(|v| v.strip_suffix('\''))
                .unwrap_or_else(|| panic!("environment {key}: only 'literals' (convention)")),
        };
        env.push((key.to_owned(), value.to_owned()));
    }
    assert!(!env.is_empty(), "no environment block found");

    let mut steps = Vec::new();
    let mut pos = 0;
    while let Some(found) = jenkinsfile[pos..].find("sh ") {
        let at = pos + found;
        let after = &jenkinsfile[at + 3..];
        pos = at + 3;
        let word_start = at == 0 || !jenkinsfile.as_bytes()[at - 1].is_ascii_alphanumeric();
        if !word_start || !(after.starts_with('\'') || after.starts_with('"')) {
            continue;
        }
        assert!(
            after.starts_with("'''"),
            "every sh step is a single-quoted sh '''...''' block (convention): {}",
            &after[..after.len().min(60)]
        );
        let body_len = after[3..].find("'''").expect("unterminated sh '''");
        let body = after[3..3 + body_len].to_owned();
        assert!(
            !body.contains('\\'),
            "no backslashes in sh bodies (Groovy would rewrite them): {body}"
        );
        pos = at + 3 + 3 + body_len + 3;
        let before = &jenkinsfile[..at];
        let label = [
            last_between(before, "label '", "'"),
            last_between(before, "node('", "'"),
        ]
        .into_iter()
        .flatten()
        .max_by_key(|(at, _)| *at)
        .expect("an agent label before every sh step")
        .1;
        let credential = last_between(before, "credentialsId: ", ",")
            .expect("credentials before every sh step")
            .1;
        let stage = last_between(before, "stage('", "'").expect("a stage").1;
        steps.push(Step {
            stage: if before.rfind("post {") > before.rfind("stage('") {
                "post".to_owned()
            } else {
                stage
            },
            label,
            credential,
            body,
        });
    }
    (env, steps)
}

/// `ferry serve` on 127.0.0.1 with the tokens of docs/jenkins.md.
struct Server {
    serve: Serve,
    /// Token name → token file.
    tokens: BTreeMap<String, PathBuf>,
}

/// The ```toml block of docs/jenkins.md that holds the `[[token]]` entries.
fn doc_server_config() -> String {
    JENKINS_MD
        .split("```toml\n")
        .skip(1)
        .map(|b| b.split("```").next().unwrap())
        .find(|b| b.contains("[[token]]"))
        .expect("docs/jenkins.md has the server's token config")
        .to_owned()
}

fn start_server(root: &Path) -> Server {
    let mut tokens = BTreeMap::new();
    let mut hashes = BTreeMap::new();
    for (_, name) in CREDENTIALS {
        let file = root.join(format!("{name}.token"));
        hashes.insert(name, new_token(&file));
        tokens.insert(name.to_owned(), file);
    }
    // The doc's tokens, with their placeholder hashes replaced.
    let mut current = None;
    let mut tokens_toml = String::new();
    for line in doc_server_config().lines() {
        if let Some(name) = line.strip_prefix("name = ") {
            current = Some(name.trim_matches('"').to_owned());
        }
        if line.starts_with("sha256 = ") {
            let name = current.as_deref().expect("name before sha256");
            let hash = hashes
                .get(name)
                .unwrap_or_else(|| panic!("docs/jenkins.md token {name:?} has no credential"));
            tokens_toml.push_str(&format!("sha256 = \"{hash}\"\n"));
        } else {
            tokens_toml.push_str(line);
            tokens_toml.push('\n');
        }
    }
    Server {
        serve: serve(root, &tokens_toml),
        tokens,
    }
}

/// A fake `docker`: `save` emits `$FAKE_DOCKER/image.tar` for the tag in
/// `$FAKE_DOCKER/tag`; `load` checks it gets exactly those bytes and
/// records the tag as loaded on `$NODE_NAME`; `run` needs the image loaded
/// on that node; `build` checks the tag. Every call is logged.
const FAKE_DOCKER: &str = r#"#!/bin/bash
set -euo pipefail
log="$FAKE_DOCKER/log"
echo "$NODE_NAME docker $*" >> "$log"
want_tag=$(cat "$FAKE_DOCKER/tag")
case "${1:-}" in
build)
    [ "$2" = "-t" ] && [ "$3" = "$want_tag" ] || { echo "fake docker: build $*: unexpected tag" >&2; exit 1; }
    ;;
save)
    [ "$2" = "$want_tag" ] || { echo "Error response from daemon: reference does not exist: $2" >&2; exit 1; }
    cat "$FAKE_DOCKER/image.tar"
    ;;
load)
    got=$(mktemp)
    cat > "$got"
    if cmp -s "$got" "$FAKE_DOCKER/image.tar"; then
        rm -f "$got"
        echo "$want_tag" >> "$FAKE_DOCKER/loaded.$NODE_NAME"
        echo "Loaded image: $want_tag"
        echo "$NODE_NAME load ok" >> "$log"
    else
        echo "fake docker: load got $(wc -c < "$got") bytes that are not the saved image" >&2
        rm -f "$got"
        exit 1
    fi
    ;;
run)
    shift
    while [ "${1:-}" != "" ] && [ "${1#-}" != "$1" ]; do
        case "$1" in --gpus) shift 2 ;; *) shift ;; esac
    done
    grep -qxF "$1" "$FAKE_DOCKER/loaded.$NODE_NAME" 2>/dev/null || { echo "Unable to find image '$1' locally" >&2; exit 1; }
    echo "$NODE_NAME run $*" >> "$log"
    ;;
*)
    echo "fake docker: unsupported: $*" >&2
    exit 1
    ;;
esac
"#;

/// One test run: the server, fake docker, a `bin` directory for PATH.
struct Rig {
    env: Env,
    server: Server,
    bin: PathBuf,
    docker: PathBuf,
}

fn rig() -> Rig {
    let env = Env::new();
    let server = start_server(env.dir.path());
    let bin = env.path("bin");
    fs::create_dir_all(&bin).unwrap();
    std::os::unix::fs::symlink(FERRY, bin.join("ferry")).unwrap();
    fs::write(bin.join("docker"), FAKE_DOCKER).unwrap();
    fs::set_permissions(bin.join("docker"), fs::Permissions::from_mode(0o755)).unwrap();
    let docker = env.path("fake-docker");
    fs::create_dir_all(&docker).unwrap();
    Rig {
        env,
        server,
        bin,
        docker,
    }
}

/// What one pipeline run needs to know.
struct Build<'a> {
    branch: &'a str,
    change_id: Option<&'a str>,
    number: &'a str,
    commit: &'a str,
}

impl Build<'_> {
    fn scope(&self) -> String {
        match self.change_id {
            Some(id) => format!("pr/{id}/{}", self.number),
            None => format!("ci/{}/{}", self.branch, self.number),
        }
    }

    fn token_id(&self) -> &'static str {
        if self.change_id.is_some() {
            "ferry-pr-token"
        } else {
            "ferry-branch-token"
        }
    }
}

impl Rig {
    fn token(&self, credential_id: &str) -> &Path {
        let name = CREDENTIALS
            .iter()
            .find(|(id, _)| *id == credential_id)
            .unwrap_or_else(|| panic!("unknown credential {credential_id}"))
            .1;
        &self.server.tokens[name]
    }

    /// `ferry ARGS` against the server with the token of `credential_id`.
    fn remote(&self, credential_id: &str, args: &[&str], input: Option<&[u8]>) -> Out {
        let mut c = Command::new(FERRY);
        c.env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("FERRY_STORE", self.env.path("operator-store"))
            .env("FERRY_REMOTE", &self.server.serve.remote)
            .env("FERRY_SERVER_CERT", &self.server.serve.cert)
            .env("FERRY_TOKEN_FILE", self.token(credential_id))
            .args(args);
        run(&mut c, input)
    }

    /// The server's names under `prefix` (read with the branch token,
    /// which reads everything).
    fn server_names(&self, prefix: &str) -> Vec<String> {
        let out = self.remote("ferry-branch-token", &["--json", "ls", prefix], None);
        out.ok();
        out.json()
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["name"].as_str().unwrap().to_owned())
            .collect()
    }

    /// Run every step of the Jenkinsfile for `build`; before the `post`
    /// cleanup, `before_cleanup` sees the rig.
    fn pipeline(&self, build: &Build<'_>, before_cleanup: &dyn Fn(&Rig)) {
        let (env_block, steps) = parse(JENKINSFILE);
        let image_tag = format!("ci_gpu:{}", build.commit);
        let image = image_archive(
            Layout::DockerOci,
            &[layer_files(400, 6, 300_000), layer_files(401, 4, 200_000)],
            &image_tag,
            1_700_000_000,
        );
        fs::write(self.docker.join("image.tar"), &image.bytes).unwrap();
        fs::write(self.docker.join("tag"), &image_tag).unwrap();
        let _ = fs::remove_file(self.docker.join("log"));
        let root = self
            .env
            .path(&format!("jenkins-{}", build.scope().replace('/', "-")));
        let mut cleaned = false;
        for (i, step) in steps.iter().enumerate() {
            if step.stage == "post" && !cleaned {
                before_cleanup(self);
                cleaned = true;
            }
            // Each stage runs on an agent of its own, with its own cache.
            let node = format!("{}-{}", step.label, step.stage);
            let node_dir = root.join(&node);
            let ws = node_dir.join("workspace");
            let ws_tmp = node_dir.join("workspace@tmp");
            fs::create_dir_all(&ws).unwrap();
            fs::create_dir_all(&ws_tmp).unwrap();
            // withCredentials(file(...)): a copy of the secret file.
            let credential_id = match step.credential.as_str() {
                "env.FERRY_TOKEN_ID" => build.token_id().to_owned(),
                literal => literal.trim_matches('\'').to_owned(),
            };
            let token_copy = ws_tmp.join(format!("secretFiles-{i}"));
            fs::copy(self.token(&credential_id), &token_copy).unwrap();
            let script = ws_tmp.join(format!("script-{i}.sh"));
            fs::write(&script, &step.body).unwrap();
            fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
            let mut c = if step.body.starts_with("#!") {
                Command::new(&script)
            } else {
                let mut c = Command::new("/bin/sh");
                c.arg("-xe").arg(&script);
                c
            };
            c.env_clear().current_dir(&ws);
            for (k, v) in &env_block {
                c.env(k, v);
            }
            c.env(
                "PATH",
                format!("{}:/usr/local/bin:/usr/bin:/bin", self.bin.display()),
            )
            .env("HOME", &node_dir)
            .env("WORKSPACE", &ws)
            .env("NODE_NAME", &node)
            .env("BRANCH_NAME", build.branch)
            .env("BUILD_NUMBER", build.number)
            .env("GIT_COMMIT", build.commit)
            .env("FERRY_SCOPE", build.scope())
            .env("FERRY_TOKEN_ID", build.token_id())
            .env("FERRY_TOKEN_FILE", &token_copy)
            // The test's server, and one store per agent.
            .env("FERRY_REMOTE", &self.server.serve.remote)
            .env("FERRY_SERVER_CERT", &self.server.serve.cert)
            .env("FERRY_STORE", node_dir.join("ferry-store"))
            .env("FAKE_DOCKER", &self.docker);
            if let Some(id) = build.change_id {
                c.env("CHANGE_ID", id);
            }
            let out = run(&mut c, None);
            assert_eq!(
                out.code(),
                Some(0),
                "step {i} ({} on {}) failed:\n{}\nstdout: {}\nstderr: {}",
                step.stage,
                step.label,
                step.body,
                out.out(),
                out.stderr
            );
            if step.stage == "post" {
                assert!(
                    !out.stderr.contains("could not drop"),
                    "the cleanup failed: {}",
                    out.stderr
                );
            }
        }
        assert!(cleaned, "the Jenkinsfile has a post cleanup step");

        // Every test stage loaded the exact image and ran it, on its own node.
        let log = fs::read_to_string(self.docker.join("log")).unwrap();
        for label in ["cpu-cpu", "gpu-gpu", "arm-arm"] {
            assert!(
                log.contains(&format!("{label} load ok")),
                "{label} did not load the image:\n{log}"
            );
            assert!(
                log.contains(&format!("{label} run ")),
                "{label} did not run it:\n{log}"
            );
        }
        assert!(log.contains("cpu-build docker save"), "{log}");
    }
}

/// The expected steps: build, three test stages, cleanup.
#[test]
fn jenkinsfile_follows_its_conventions_and_matches_the_doc() {
    let (env, steps) = parse(JENKINSFILE);
    let keys: Vec<&str> = env.iter().map(|(k, _)| k.as_str()).collect();
    for k in ["FERRY_REMOTE", "FERRY_SERVER_CERT", "FERRY_STORE", "IMAGE"] {
        assert!(keys.contains(&k), "environment sets {k}");
    }
    let shape: Vec<(&str, &str, &str)> = steps
        .iter()
        .map(|s| (s.stage.as_str(), s.label.as_str(), s.credential.as_str()))
        .collect();
    assert_eq!(
        shape,
        [
            ("build", "cpu", "env.FERRY_TOKEN_ID"),
            ("cpu", "cpu", "env.FERRY_TOKEN_ID"),
            ("gpu", "gpu", "env.FERRY_TOKEN_ID"),
            ("arm", "arm", "env.FERRY_TOKEN_ID"),
            ("post", "cpu", "env.FERRY_TOKEN_ID"),
        ]
    );
    assert!(steps[0].body.contains("| ferry stash --remote"));
    for s in &steps[1..4] {
        assert!(s.body.contains("ferry unstash --remote") && s.body.contains("| docker load"));
    }
    assert!(steps[4].body.contains("ferry rm --remote") && steps[4].body.contains("--prefix"));
    // docs/jenkins.md shows the whole file.
    let shown = JENKINS_MD
        .split("```groovy\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("a groovy block in docs/jenkins.md");
    assert_eq!(
        shown, JENKINSFILE,
        "docs/jenkins.md and docs/Jenkinsfile differ"
    );
}

#[test]
fn jenkinsfile_runs_for_branch_and_pull_request_builds() {
    let rig = rig();

    // A published image the pull request must not be able to replace.
    let published = mixed_bytes(402, 2 << 20);
    rig.remote(
        "ferry-branch-token",
        &["stash", "ci/main/base/ci_gpu", "-"],
        Some(&published),
    )
    .ok();

    // A branch build: main, build 42.
    let branch = Build {
        branch: "main",
        change_id: None,
        number: "42",
        commit: "0123456789abcdef0123456789abcdef01234567",
    };
    rig.pipeline(&branch, &|rig| {
        assert_eq!(rig.server_names("ci/main/42"), ["ci/main/42/ci_gpu"]);
    });
    assert_eq!(rig.server_names("ci/main/42"), Vec::<String>::new());
    assert_eq!(rig.server_names("ci"), ["ci/main/base/ci_gpu"]);

    // A pull-request build: PR-1234, build 7, with the pull-request token.
    let pr = Build {
        branch: "PR-1234",
        change_id: Some("1234"),
        number: "7",
        commit: "89abcdef0123456789abcdef0123456789abcdef",
    };
    rig.pipeline(&pr, &|rig| {
        assert_eq!(rig.server_names("pr/1234/7"), ["pr/1234/7/ci_gpu"]);
        // The pull-request token writes its own scope only: pushing over
        // what branch builds publish is refused and sends nothing...
        for name in ["ci/main/base/ci_gpu", "ci/main/43/ci_gpu"] {
            let out = rig.remote(
                "ferry-pr-token",
                &["stash", name, "-"],
                Some(b"a malicious image"),
            );
            out.expect_code(2);
            assert!(
                out.stderr.contains("may not write"),
                "refused for the scope: {}",
                out.stderr
            );
        }
        // ...and it cannot drop other scopes, with rm or with gc.
        for args in [
            &["rm", "--prefix", "ci"][..],
            &["rm", "--prefix", ""],
            &["rm", "ci/main/base/ci_gpu"],
            &["gc", "--prefix", "ci"],
        ] {
            let out = rig.remote("ferry-pr-token", args, None);
            out.expect_code(2);
            assert!(
                out.stderr.contains("forbidden") || out.stderr.contains("may not write"),
                "{args:?}: {}",
                out.stderr
            );
        }
        assert_eq!(rig.server_names("ci"), ["ci/main/base/ci_gpu"]);
        assert_eq!(rig.server_names("pr"), ["pr/1234/7/ci_gpu"]);
    });
    assert_eq!(rig.server_names("pr"), Vec::<String>::new());

    // The published image is intact, byte for byte.
    let out = rig.remote(
        "ferry-branch-token",
        &["unstash", "ci/main/base/ci_gpu", "-"],
        None,
    );
    out.ok();
    assert_bytes_eq(&out.stdout, &published, "ci/main/base/ci_gpu");
    assert!(rig
        .server
        .serve
        .store
        .join("refs/ci/main/base/ci_gpu.ref")
        .is_file());
}
