//! Stage timing from builds with the filters' `stage-timing` feature (`make bench-stages`): the
//! lines each worker logs, read back from each scenario's Envoy log after the rounds.

use oidc_filter::abi::timing::{LINE_PREFIX, STAGES};
use serde_json::{json, Map, Value};

use super::{median, Scenario};

/// One scenario's stages: (name, median over the logged lines of the mean ns per stream).
#[derive(Clone, Debug)]
pub struct StageTimes {
    /// The scenario.
    pub scenario: Scenario,
    /// Stages in the order the filter logs them.
    pub stages: Vec<(String, f64)>,
    /// Lines the medians are taken over (each the mean of many streams).
    pub lines: usize,
}

/// The stages logged in `log` (an Envoy log); `None` when the module was not instrumented or
/// logged no more than one line. A worker's first line is left out: it holds the login, the
/// checks and the start of the warm-up, while V8 still compiles the module's hot code.
pub fn parse(scenario: Scenario, log: &str) -> Option<StageTimes> {
    let mut names: Vec<String> = Vec::new();
    let mut values: Vec<Vec<f64>> = Vec::new();
    let mut lines = 0;
    let mut first_seen: Vec<String> = Vec::new();
    for line in log.lines() {
        let Some((head, rest)) = line.split_once(LINE_PREFIX) else {
            continue;
        };
        let Some((_, pairs)) = rest.split_once("):") else {
            continue;
        };
        // Envoy prefixes each line with `[time][thread id]`: one first line per worker.
        let thread = head.split(']').nth(1).unwrap_or_default().to_string();
        if !first_seen.contains(&thread) {
            first_seen.push(thread);
            continue;
        }
        lines += 1;
        for pair in pairs.split_whitespace() {
            let Some((name, ns)) = pair.split_once('=') else {
                continue;
            };
            let Ok(ns) = ns.parse::<f64>() else {
                continue;
            };
            match names.iter().position(|n| n == name) {
                Some(i) => values[i].push(ns),
                None => {
                    names.push(name.to_string());
                    values.push(vec![ns]);
                }
            }
        }
    }
    (lines > 0).then(|| StageTimes {
        scenario,
        stages: names
            .into_iter()
            .zip(values.iter().map(|v| median(v)))
            .collect(),
        lines,
    })
}

/// One set of stage times per scenario from several sets of Envoys (`--processes`): per stage,
/// the median of the sets' medians; lines added up. Scenarios in the order first seen.
pub fn merge(sets: Vec<Vec<StageTimes>>) -> Vec<StageTimes> {
    let mut out: Vec<(StageTimes, Vec<Vec<f64>>)> = Vec::new();
    for t in sets.into_iter().flatten() {
        let i = match out.iter().position(|(o, _)| o.scenario == t.scenario) {
            Some(i) => i,
            None => {
                out.push((
                    StageTimes {
                        scenario: t.scenario,
                        stages: Vec::new(),
                        lines: 0,
                    },
                    Vec::new(),
                ));
                out.len() - 1
            }
        };
        let (merged, values) = &mut out[i];
        merged.lines += t.lines;
        for (name, v) in t.stages {
            match merged.stages.iter().position(|(n, _)| *n == name) {
                Some(j) => values[j].push(v),
                None => {
                    merged.stages.push((name, v));
                    values.push(vec![v]);
                }
            }
        }
    }
    out.into_iter()
        .map(|(mut t, values)| {
            for ((_, v), all) in t.stages.iter_mut().zip(&values) {
                *v = median(all);
            }
            t
        })
        .collect()
}

/// The stages as a table: one row per stage, one column per scenario, ns.
pub fn table(times: &[StageTimes], markdown: bool) -> String {
    let mut names: Vec<&str> = Vec::new();
    for t in times {
        for (n, _) in &t.stages {
            if !names.contains(&n.as_str()) {
                names.push(n);
            }
        }
    }
    // Stream order, whichever filter logged a stage first.
    let order = |name: &str| STAGES.iter().position(|s| s.name() == name);
    names.sort_by_key(|n| order(n).unwrap_or(usize::MAX));
    let cell = |t: &StageTimes, name: &str| {
        t.stages
            .iter()
            .find(|(n, _)| n == name)
            .map_or("-".to_string(), |(_, v)| format!("{v:.0}"))
    };
    let line = |first: &str, rest: Vec<String>| {
        if markdown {
            format!("| {first} | {} |\n", rest.join(" | "))
        } else {
            let cells: String = rest.iter().map(|c| format!(" {c:>22}")).collect();
            format!("{first:<24}{cells}\n")
        }
    };
    let mut s = line(
        "stage (ns per stream)",
        times.iter().map(|t| t.scenario.id().to_string()).collect(),
    );
    if markdown {
        s.push_str(&format!("|---|{}\n", "---:|".repeat(times.len())));
    }
    for name in names {
        s.push_str(&line(name, times.iter().map(|t| cell(t, name)).collect()));
    }
    s
}

/// `{scenario id: {stage: ns}}`.
pub fn to_json(times: &[StageTimes]) -> Value {
    let mut out = Map::new();
    for t in times {
        let stages: Map<String, Value> = t
            .stages
            .iter()
            .map(|(n, v)| (n.clone(), json!(v)))
            .collect();
        out.insert(
            t.scenario.id().to_string(),
            json!({ "lines": t.lines, "ns_per_stream": stages }),
        );
    }
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_per_stage_from_the_logged_lines_only() {
        let log = "\
[t0][7][info] something else create=999
[t0][7][warning] wasm log: stage timing: on, one line per 20000 streams of each worker
[t1][7][warning] wasm log: stage timing (ns per stream, mean of 20000): create=9 header_read=9
[t1][8][warning] wasm log: stage timing (ns per stream, mean of 20000): create=8 header_read=8
[t2][7][warning] wasm log: stage timing (ns per stream, mean of 20000): create=100 header_read=2500 done=40
[t3][7][warning] wasm log: stage timing (ns per stream, mean of 20000): create=300 header_read=2700 done=60
[t4][8][warning] wasm log: stage timing (ns per stream, mean of 20000): create=200 header_read=9000
";
        let t = parse(Scenario::NoopWasm, log).unwrap();
        assert_eq!(t.lines, 3);
        assert_eq!(
            t.stages,
            vec![
                ("create".to_string(), 200.0),
                ("header_read".to_string(), 2700.0),
                ("done".to_string(), 50.0),
            ]
        );
        assert!(parse(Scenario::NoopWasm, "[info] no timing here").is_none());

        let other = StageTimes {
            scenario: Scenario::NoopWasm,
            stages: vec![("create".to_string(), 400.0), ("parse".to_string(), 7.0)],
            lines: 2,
        };
        let third = StageTimes {
            scenario: Scenario::NoopWasm,
            stages: vec![("create".to_string(), 600.0)],
            lines: 1,
        };
        let merged = merge(vec![vec![t.clone()], vec![other, third]]);
        assert_eq!(merged.len(), 1);
        assert_eq!(merged[0].lines, 6);
        assert_eq!(
            merged[0].stages,
            vec![
                ("create".to_string(), 400.0),
                ("header_read".to_string(), 2700.0),
                ("done".to_string(), 50.0),
                ("parse".to_string(), 7.0),
            ]
        );
        let md = table(std::slice::from_ref(&t), true);
        assert!(
            md.starts_with("| stage (ns per stream) | 2-noop-wasm |\n|---|---:|\n"),
            "{md}"
        );
        assert!(md.contains("\n| header_read | 2700 |\n"), "{md}");
        let text = table(&[t], false);
        assert!(
            text.contains(&format!("\n{:<24}{:>23}\n", "header_read", "2700")),
            "{text}"
        );
    }
}
