//! With the `agones` feature: tonic's server side of the Agones SDK protos (in
//! `proto/agones`, copied from the `agones` crate) for `fleet::agones::local`. The client side
//! is the `agones` crate's own. Needs `protoc`, as the `agones` crate does.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "agones")]
    agones_server();
}

#[cfg(feature = "agones")]
fn agones_server() {
    println!("cargo:rerun-if-changed=proto/agones");
    tonic_build::configure()
        .build_client(false)
        .build_server(true)
        .compile_protos(
            &[
                "proto/agones/sdk/sdk.proto",
                "proto/agones/sdk/beta/beta.proto",
            ],
            &[
                "proto/agones/googleapis",
                "proto/agones/grpc-gateway",
                "proto/agones/sdk",
                "proto/agones/sdk/beta",
            ],
        )
        .unwrap_or_else(|e| panic!("generating the Agones SDK server from its protos: {e}"));
}
