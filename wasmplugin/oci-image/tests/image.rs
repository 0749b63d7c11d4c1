//! The image: reproducible digests, and a real round trip through Debian's `docker-registry`
//! with skopeo, driven through the same scripts `make image`, `make push` and `make render` run.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use oci_image::oci;
use serde_json::Value;

fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout_line(out: &Output) -> String {
    String::from_utf8(out.stdout.clone())
        .unwrap()
        .trim()
        .to_owned()
}

fn build_layout(wasm: &Path, layout: &Path, variant: &str) -> String {
    let out = run_ok(
        Command::new(common::tool())
            .arg("--wasm")
            .arg(wasm)
            .arg("--out")
            .arg(layout)
            .args(["--variant", variant, "--tag", "v1"]),
    );
    stdout_line(&out)
}

fn blob(layout: &Path, digest: &str) -> Vec<u8> {
    fs::read(
        layout
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:")),
    )
    .unwrap()
}

fn tagged_manifest_digest(layout: &Path, tag: &str) -> String {
    let index: Value =
        serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
    let entry = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"][oci::REF_NAME_ANNOTATION] == tag)
        .unwrap_or_else(|| panic!("no manifest tagged {tag} in {}", layout.display()));
    entry["digest"].as_str().unwrap().to_owned()
}

#[test]
fn same_module_same_digest_different_module_different_digest() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.wasm");
    let b = dir.path().join("b.wasm");
    fs::write(&a, common::TINY_WASM).unwrap();
    // Same module plus an empty custom section named "x".
    let mut other = common::TINY_WASM.to_vec();
    other.extend_from_slice(&[0, 2, 1, b'x']);
    fs::write(&b, &other).unwrap();

    for variant in ["compat", "wasm-artifact"] {
        let first = build_layout(&a, &dir.path().join(format!("{variant}-1")), variant);
        let second = build_layout(&a, &dir.path().join(format!("{variant}-2")), variant);
        let different = build_layout(&b, &dir.path().join(format!("{variant}-3")), variant);
        assert!(first.starts_with("sha256:") && first.len() == 71, "{first}");
        assert_eq!(first, second, "{variant}: same module, different digest");
        assert_ne!(
            first, different,
            "{variant}: different modules, same digest"
        );
        // Byte-identical blobs, and the printed digest is the manifest's sha256.
        for layout in [format!("{variant}-1"), format!("{variant}-2")] {
            let layout = dir.path().join(layout);
            assert_eq!(tagged_manifest_digest(&layout, "v1"), first);
            assert_eq!(oci::sha256_digest(&blob(&layout, &first)), first);
        }
        let list = |n: &str| {
            let mut names: Vec<_> =
                fs::read_dir(dir.path().join(format!("{variant}-{n}/blobs/sha256")))
                    .unwrap()
                    .map(|e| e.unwrap().file_name())
                    .collect();
            names.sort();
            names
        };
        assert_eq!(list("1"), list("2"));
    }
}

#[test]
fn refuses_a_file_that_is_not_wasm() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.wasm");
    fs::write(&bad, b"#!/bin/sh\necho hi\n").unwrap();
    let out = Command::new(common::tool())
        .arg("--wasm")
        .arg(&bad)
        .arg("--out")
        .arg(dir.path().join("layout"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("\\0asm"));
    assert!(!dir.path().join("layout").exists());
}

// ---- registry round trip ----

/// Debian's `docker-registry` on a free loopback port, killed on drop.
struct Registry {
    child: Child,
    port: u16,
    _storage: tempfile::TempDir,
}

fn find_program(name: &str, fallback: &str) -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    });
    let path = found.unwrap_or_else(|| PathBuf::from(fallback));
    assert!(
        path.is_file(),
        "`{name}` not found: the registry round trip needs Debian's packages skopeo and \
         docker-registry (apt-get install -y skopeo docker-registry)"
    );
    path
}

impl Registry {
    fn start() -> Self {
        let program = find_program("docker-registry", "/usr/bin/docker-registry");
        let mut last_error = String::new();
        for _ in 0..3 {
            let storage = tempfile::tempdir().unwrap();
            let port = TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let config = storage.path().join("config.yml");
            fs::write(
                &config,
                format!(
                    "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
                     http:\n  addr: 127.0.0.1:{port}\n",
                    storage.path().join("data").display()
                ),
            )
            .unwrap();
            let log = fs::File::create(storage.path().join("registry.log")).unwrap();
            let child = Command::new(&program)
                .arg("serve")
                .arg(&config)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
            let mut registry = Registry {
                child,
                port,
                _storage: storage,
            };
            match registry.wait_ready(Duration::from_secs(10)) {
                Ok(()) => return registry,
                Err(e) => {
                    let log = fs::read_to_string(registry._storage.path().join("registry.log"))
                        .unwrap_or_default();
                    last_error = format!("{e}\n{log}");
                }
            }
        }
        panic!("docker-registry did not come up: {last_error}");
    }

    fn wait_ready(&mut self, limit: Duration) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("docker-registry exited: {status}"));
            }
            if self.get_v2().is_some_and(|status| status.contains(" 200 ")) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err("GET /v2/ did not answer 200 in time".into())
    }

    /// The status line of `GET /v2/`, if anything answered.
    fn get_v2(&self) -> Option<String> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        let request = format!(
            "GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\n\r\n",
            self.port
        );
        stream.write_all(request.as_bytes()).ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        response.lines().next().map(str::to_owned)
    }

    fn reference(&self, tag: &str) -> String {
        format!("127.0.0.1:{}/oidc-gate/filter:{tag}", self.port)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn skopeo() -> Command {
    let mut cmd = Command::new(find_program("skopeo", "/usr/bin/skopeo"));
    // Loopback registry of our own: no signature policy to consult.
    cmd.arg("--insecure-policy");
    cmd
}

fn script(name: &str) -> Command {
    let mut cmd = Command::new("bash");
    cmd.arg(common::wasmplugin_dir().join("scripts").join(name))
        .env("OCI_IMAGE_BIN", common::tool());
    // Only what each test sets explicitly.
    for var in [
        "WASM",
        "LAYOUT",
        "TAG",
        "VARIANT",
        "IMAGE",
        "DIGEST",
        "HOSTS",
        "ISSUER",
        "OVERLAY",
        "OUT",
        "CRD",
        "PUSH_ENV",
        "TLS_VERIFY",
        "CREDS",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

/// The filter if it has been built, else the tiny module.
fn module_under_test(dir: &Path) -> (PathBuf, Vec<u8>) {
    let built = common::repo_root().join("target/wasm32-wasip1/release/oidc_filter.wasm");
    if built.is_file() {
        let bytes = fs::read(&built).unwrap();
        return (built, bytes);
    }
    let path = dir.join("tiny.wasm");
    fs::write(&path, common::TINY_WASM).unwrap();
    (path, common::TINY_WASM.to_vec())
}

fn inspect_raw(reference: &str) -> Vec<u8> {
    run_ok(
        skopeo()
            .args(["inspect", "--raw", "--tls-verify=false"])
            .arg(format!("docker://{reference}")),
    )
    .stdout
}

fn pull(reference: &str, layout: &Path, tag: &str) {
    run_ok(
        skopeo()
            .args(["copy", "--quiet", "--src-tls-verify=false"])
            .arg(format!("docker://{reference}"))
            .arg(format!("oci:{}:{tag}", layout.display())),
    );
}

#[test]
fn image_push_pull_and_render_agree_on_the_manifest_digest() {
    let dir = tempfile::tempdir().unwrap();
    let (wasm_path, wasm) = module_under_test(dir.path());
    let layout = dir.path().join("layout");
    let push_env = dir.path().join("push.env");
    let registry = Registry::start();

    // make image (positional module, as the Makefile calls it)
    let printed = stdout_line(&run_ok(
        script("image.sh")
            .arg(&wasm_path)
            .env("LAYOUT", &layout)
            .env("TAG", "t1"),
    ));
    assert!(printed.starts_with("sha256:"), "{printed}");

    // make push (positional image reference, as the Makefile calls it)
    let reference = registry.reference("t1");
    let pushed = stdout_line(&run_ok(
        script("push.sh")
            .arg(&reference)
            .env("LAYOUT", &layout)
            .env("TAG", "t1")
            .env("PUSH_ENV", &push_env),
    ));
    assert_eq!(
        pushed, printed,
        "push.sh digest differs from image.sh digest"
    );

    // What istio-agent fetches: the raw manifest.
    let raw = inspect_raw(&reference);
    assert_eq!(
        oci::sha256_digest(&raw),
        printed,
        "registry manifest digest"
    );
    let manifest: Value = serde_json::from_slice(&raw).unwrap();
    assert_eq!(manifest["mediaType"], oci::MANIFEST_MEDIA_TYPE);
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1);
    assert_eq!(layers[0]["mediaType"], oci::TAR_GZIP_LAYER_MEDIA_TYPE);

    // Pull it back and unpack the layer as the agent does.
    let back = dir.path().join("back");
    pull(&reference, &back, "t1");
    assert_eq!(tagged_manifest_digest(&back, "t1"), printed);
    let layer = blob(&back, layers[0]["digest"].as_str().unwrap());
    let module = oci::plugin_from_compat_layer(&layer).unwrap();
    assert!(module.starts_with(b"\0asm"));
    assert_eq!(
        module,
        wasm,
        "plugin.wasm differs from {}",
        wasm_path.display()
    );

    // make render: the WasmPlugin pins exactly that digest.
    let out_dir = dir.path().join("out");
    let rendered = stdout_line(&run_ok(
        script("render.sh")
            .env("PUSH_ENV", &push_env)
            .env("OVERLAY", "dex")
            .env("OUT", &out_dir)
            .env("CRD", common::crd_path()),
    ));
    let docs = oci_image::parse_yaml_documents(&fs::read_to_string(&rendered).unwrap()).unwrap();
    let plugin = oci_image::yaml_to_json(&docs[0]).unwrap();
    assert_eq!(plugin["kind"], "WasmPlugin");
    assert_eq!(plugin["spec"]["url"], format!("oci://{reference}"));
    assert_eq!(
        format!("sha256:{}", plugin["spec"]["sha256"].as_str().unwrap()),
        printed
    );
    let errors = common::crd().validate(&plugin);
    assert!(errors.is_empty(), "{errors:?}");
}

#[test]
fn wasm_artifact_variant_round_trips_with_two_layers() {
    let dir = tempfile::tempdir().unwrap();
    let (wasm_path, wasm) = module_under_test(dir.path());
    let layout = dir.path().join("layout");
    let registry = Registry::start();
    let printed = stdout_line(&run_ok(
        script("image.sh")
            .env("WASM", &wasm_path)
            .env("LAYOUT", &layout)
            .env("TAG", "art")
            .env("VARIANT", "wasm-artifact"),
    ));
    let reference = registry.reference("art");
    let pushed = stdout_line(&run_ok(
        script("push.sh")
            .env("IMAGE", &reference)
            .env("LAYOUT", &layout)
            .env("TAG", "art")
            .env("PUSH_ENV", dir.path().join("push.env")),
    ));
    assert_eq!(pushed, printed);
    let raw = inspect_raw(&reference);
    assert_eq!(oci::sha256_digest(&raw), printed);
    let manifest: Value = serde_json::from_slice(&raw).unwrap();
    assert_eq!(manifest["config"]["mediaType"], oci::WASM_CONFIG_MEDIA_TYPE);
    let layers = manifest["layers"].as_array().unwrap();
    // istio-agent: "number of layers must be 2"; the module is the raw wasm-typed layer.
    assert_eq!(layers.len(), 2);
    let wasm_layer = layers
        .iter()
        .find(|l| l["mediaType"] == oci::WASM_LAYER_MEDIA_TYPE)
        .unwrap();
    let back = dir.path().join("back");
    pull(&reference, &back, "art");
    assert_eq!(blob(&back, wasm_layer["digest"].as_str().unwrap()), wasm);
}
