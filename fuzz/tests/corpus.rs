//! Replays the committed corpus (`fuzz/corpus/<target>/*`) through the fuzz targets on
//! stable: every input the fuzzer found interesting, and every crash it ever found (kept in
//! the corpus once fixed), runs on every CI run. A target without inputs fails the test: a
//! corpus that went missing must not pass as "nothing crashed".

use std::path::Path;

#[test]
fn every_corpus_input_runs_through_its_target() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    for (name, target) in tickshard_fuzz::TARGETS {
        let dir = root.join(name);
        let mut inputs: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .flatten()
            .map(|e| e.path())
            .collect();
        inputs.sort();
        assert!(!inputs.is_empty(), "no corpus for target {name}");
        for input in &inputs {
            let data = std::fs::read(input).expect("corpus file");
            let run = std::panic::catch_unwind(|| target(&data));
            assert!(run.is_ok(), "target {name} failed on {}", input.display());
        }
        eprintln!("{name}: {} inputs", inputs.len());
    }
}

/// The hand-made seeds are well-formed (so the fuzzer starts from inputs that reach past the
/// first checks): each decodes.
#[test]
fn seeds_are_well_formed() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let seeds = |target: &str| {
        let dir = root.join(target);
        std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("seed-"))
            .map(|e| (e.path(), std::fs::read(e.path()).expect("seed")))
            .collect::<Vec<_>>()
    };
    for (path, data) in seeds("control") {
        assert!(
            tickshard_schema::ControlMsg::decode(&data).is_ok(),
            "{}",
            path.display()
        );
    }
    for (path, data) in seeds("snapshot") {
        let snap = tickshard_schema::decode_snapshot(&data).expect("snapshot seed");
        assert!(
            snap.changes().is_some_and(|c| !c.is_empty()),
            "{}",
            path.display()
        );
    }
    for (path, data) in seeds("input") {
        assert!(
            tickshard_schema::InputDatagram::decode(&data).is_ok(),
            "{}",
            path.display()
        );
    }
    let (_, play) = seeds("shard")
        .into_iter()
        .find(|(p, _)| p.ends_with("seed-play"))
        .expect("the play seed");
    let run = tickshard_fuzz::shard_run(&play);
    assert!(run.welcomed >= 3 && run.most_seated >= 2, "{run:?}");
    assert!(
        run.rooms_ended >= 1,
        "the fault button ends a room: {run:?}"
    );
}
