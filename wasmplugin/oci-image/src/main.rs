//! `oci-image`: packages oidc-gate for Istio. See `wasmplugin/README.md`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use oci_image::crd::CrdSchema;
use oci_image::oci::{self, Variant};
use oci_image::{kustomize, render, Error};

const USAGE: &str = "\
usage:
  oci-image --wasm <file> --out <layout dir> [--variant compat|wasm-artifact] [--tag v1]
      Writes an OCI image layout; prints the manifest digest (sha256:...).
  oci-image render --overlay <dir> --image <registry/repo:tag> --digest <sha256:...>
                   [--hosts a.example.com,b.example.com] [--issuer https://...]
                   [--out <dir>] [--crd <wasmplugin-crd.yaml>]
      Builds the kustomization in <dir> without kustomize, fills in url/sha256/hosts/issuer,
      writes <out>/<overlay name>.yaml (default out: wasmplugin/out) and prints its path.
  oci-image validate --crd <wasmplugin-crd.yaml> <file.yaml>...
      Validates every WasmPlugin in the files against the CRD schema.";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("render") => run_render(&args[1..]),
        Some("validate") => run_validate(&args[1..]),
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        _ => run_image(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(msg)) => {
            eprintln!("oci-image: {msg}\n{USAGE}");
            ExitCode::from(2)
        }
        Err(Failure::Error(e)) => {
            eprintln!("oci-image: {e}");
            ExitCode::FAILURE
        }
    }
}

enum Failure {
    Usage(String),
    Error(Error),
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Self::Error(e)
    }
}

/// `--flag value` pairs plus positional arguments.
struct Args {
    pairs: Vec<(String, String)>,
    positional: Vec<String>,
}

impl Args {
    fn parse(args: &[String], flags: &[&str]) -> Result<Self, Failure> {
        let mut pairs = Vec::new();
        let mut positional = Vec::new();
        let mut iter = args.iter();
        while let Some(arg) = iter.next() {
            if let Some(name) = arg.strip_prefix("--") {
                let (name, inline) = match name.split_once('=') {
                    Some((n, v)) => (n, Some(v.to_owned())),
                    None => (name, None),
                };
                if !flags.contains(&name) {
                    return Err(Failure::Usage(format!("unknown option --{name}")));
                }
                let value = match inline {
                    Some(v) => v,
                    None => iter
                        .next()
                        .cloned()
                        .ok_or_else(|| Failure::Usage(format!("--{name} needs a value")))?,
                };
                if pairs.iter().any(|(n, _)| n == name) {
                    return Err(Failure::Usage(format!("--{name} given twice")));
                }
                pairs.push((name.to_owned(), value));
            } else {
                positional.push(arg.clone());
            }
        }
        Ok(Self { pairs, positional })
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn require(&self, name: &str) -> Result<&str, Failure> {
        self.get(name)
            .ok_or_else(|| Failure::Usage(format!("--{name} is required")))
    }
}

fn read(path: &Path) -> Result<Vec<u8>, Error> {
    fs::read(path).map_err(|e| Error::from(e).context(path.display()))
}

fn run_image(args: &[String]) -> Result<(), Failure> {
    let args = Args::parse(args, &["wasm", "out", "variant", "tag"])?;
    if let Some(extra) = args.positional.first() {
        return Err(Failure::Usage(format!("unexpected argument `{extra}`")));
    }
    let wasm = PathBuf::from(args.require("wasm")?);
    let out = PathBuf::from(args.require("out")?);
    let variant: Variant = args.get("variant").unwrap_or("compat").parse()?;
    let tag = args.get("tag").unwrap_or("v1");
    let module = read(&wasm)?;
    let image = oci::build_image(&module, variant).map_err(|e| e.context(wasm.display()))?;
    oci::write_layout(&image, &out, tag).map_err(|e| e.context(out.display()))?;
    println!("{}", image.digest());
    Ok(())
}

fn run_render(args: &[String]) -> Result<(), Failure> {
    let args = Args::parse(
        args,
        &[
            "overlay", "image", "digest", "hosts", "issuer", "out", "crd",
        ],
    )?;
    if let Some(extra) = args.positional.first() {
        return Err(Failure::Usage(format!("unexpected argument `{extra}`")));
    }
    let overlay = PathBuf::from(args.require("overlay")?);
    let values = render::Values {
        image: args.require("image")?.to_owned(),
        digest: args.require("digest")?.to_owned(),
        hosts: args.get("hosts").map(render::split_hosts),
        issuer: args.get("issuer").map(str::to_owned),
    };
    let out_dir = PathBuf::from(args.get("out").unwrap_or("wasmplugin/out"));
    let mut docs = kustomize::build(&overlay)?;
    for warning in render::apply(&mut docs, &values)? {
        eprintln!("oci-image: warning: {warning}");
    }
    if let Some(crd) = args.get("crd") {
        let schema = load_crd(Path::new(crd))?;
        let mut problems = Vec::new();
        for doc in &docs {
            let json = oci_image::yaml_to_json(doc)?;
            if schema.matches(&json) {
                problems.extend(schema.validate(&json));
            }
        }
        if !problems.is_empty() {
            return Err(Error::new(format!(
                "rendered WasmPlugin does not validate against {crd}:\n  {}",
                problems.join("\n  ")
            ))
            .into());
        }
    }
    let name = overlay
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "rendered".to_owned());
    fs::create_dir_all(&out_dir).map_err(|e| Error::from(e).context(out_dir.display()))?;
    let out_file = out_dir.join(format!("{name}.yaml"));
    let text = render::to_yaml(&docs, &overlay.display().to_string())?;
    fs::write(&out_file, text).map_err(|e| Error::from(e).context(out_file.display()))?;
    eprint!("rendered:\n{}", render::summary(&docs));
    println!("{}", out_file.display());
    Ok(())
}

fn load_crd(path: &Path) -> Result<CrdSchema, Error> {
    let text = fs::read_to_string(path).map_err(|e| Error::from(e).context(path.display()))?;
    CrdSchema::from_crd_yaml(&text).map_err(|e| e.context(path.display()))
}

fn run_validate(args: &[String]) -> Result<(), Failure> {
    let args = Args::parse(args, &["crd"])?;
    let schema = load_crd(Path::new(args.require("crd")?))?;
    if args.positional.is_empty() {
        return Err(Failure::Usage("no files to validate".into()));
    }
    let mut failed = false;
    for file in &args.positional {
        let text = fs::read_to_string(file).map_err(|e| Error::from(e).context(file))?;
        for doc in oci_image::parse_yaml_documents(&text).map_err(|e| e.context(file))? {
            let json = oci_image::yaml_to_json(&doc)?;
            if !schema.matches(&json) {
                continue;
            }
            let name = json["metadata"]["name"].as_str().unwrap_or("?");
            let mut problems = schema.validate(&json);
            if let Err(e) = render::check_plugin_config(std::slice::from_ref(&doc)) {
                problems.push(e.to_string());
            }
            if problems.is_empty() {
                println!("{file}: {} {name}: valid", schema.kind());
            } else {
                failed = true;
                println!("{file}: {} {name}: INVALID", schema.kind());
                for p in problems {
                    println!("  {p}");
                }
            }
        }
    }
    if failed {
        Err(Error::new("validation failed").into())
    } else {
        Ok(())
    }
}
