//! Server reflection v1 (what current grpcurl, Postman and grpc-cli speak; the grpcurl test
//! covers v1alpha): the services are listed and the contract, and the google.rpc error details
//! its failures carry, can be fetched whole.
use crate::common;

use ccgw_callcontrol::proto::{ERROR_DETAILS_DESCRIPTOR_SET, FILE_DESCRIPTOR_SET};
use common::spawn_app;
use prost::Message;
use tokio_stream::StreamExt;
use tonic_reflection::pb::v1::{
    server_reflection_client::ServerReflectionClient, server_reflection_request::MessageRequest,
    server_reflection_response::MessageResponse, ServerReflectionRequest,
};

async fn ask(addr: std::net::SocketAddr, request: MessageRequest) -> MessageResponse {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = ServerReflectionClient::new(channel);
    let requests = tokio_stream::iter([ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    }]);
    let mut answers = client
        .server_reflection_info(requests)
        .await
        .unwrap()
        .into_inner();
    answers
        .next()
        .await
        .expect("one answer")
        .unwrap()
        .message_response
        .expect("a response")
}

#[tokio::test]
async fn reflection_v1_lists_the_services_and_serves_the_contract() {
    let app = spawn_app().await;
    let MessageResponse::ListServicesResponse(list) =
        ask(app.grpc_addr, MessageRequest::ListServices(String::new())).await
    else {
        panic!("not a service list");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    for service in [
        "ccgw.callcontrol.v1.CallControl",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(names.contains(&service), "{service} missing from {names:?}");
    }

    let MessageResponse::FileDescriptorResponse(files) = ask(
        app.grpc_addr,
        MessageRequest::FileContainingSymbol("ccgw.callcontrol.v1.CallControl".into()),
    )
    .await
    else {
        panic!("not a file descriptor");
    };
    let served: Vec<prost_types::FileDescriptorProto> = files
        .file_descriptor_proto
        .iter()
        .map(|bytes| prost_types::FileDescriptorProto::decode(bytes.as_slice()).unwrap())
        .collect();
    let contract = served
        .iter()
        .find(|f| f.package() == "ccgw.callcontrol.v1")
        .expect("the contract's file");
    let built = prost_types::FileDescriptorSet::decode(FILE_DESCRIPTOR_SET).unwrap();
    assert_eq!(
        Some(contract),
        built.file.iter().find(|f| f.name() == contract.name()),
        "reflection serves the contract the binary was built from"
    );
    let methods: Vec<_> = contract.service[0]
        .method
        .iter()
        .map(|m| m.name())
        .collect();
    assert_eq!(methods, ["ReleaseCall", "WatchReleaseEvents"]);
}

/// grpcurl shows the status details, over reflection v1: the file declaring
/// `google.rpc.ErrorInfo` is served, is the vendored `google/rpc/error_details.proto` the binary
/// was built from, and every file it imports can be fetched by name, so a client can decode
/// every detail (RetryInfo needs `google/protobuf/duration.proto`).
#[tokio::test]
async fn reflection_v1_serves_the_error_details_and_their_imports() {
    let app = spawn_app().await;
    let MessageResponse::FileDescriptorResponse(files) = ask(
        app.grpc_addr,
        MessageRequest::FileContainingSymbol("google.rpc.ErrorInfo".into()),
    )
    .await
    else {
        panic!("google.rpc.ErrorInfo is not served");
    };
    let served: Vec<prost_types::FileDescriptorProto> = files
        .file_descriptor_proto
        .iter()
        .map(|bytes| prost_types::FileDescriptorProto::decode(bytes.as_slice()).unwrap())
        .collect();
    let details = served
        .iter()
        .find(|f| f.name() == "google/rpc/error_details.proto")
        .expect("the error details' file");
    assert_eq!(details.package(), "google.rpc");
    let built = prost_types::FileDescriptorSet::decode(ERROR_DETAILS_DESCRIPTOR_SET).unwrap();
    assert_eq!(
        Some(details),
        built.file.iter().find(|f| f.name() == details.name()),
        "reflection serves the error details the binary was built from"
    );
    let messages: Vec<_> = details.message_type.iter().map(|m| m.name()).collect();
    for message in ["ErrorInfo", "RetryInfo", "BadRequest", "RequestInfo"] {
        assert!(
            messages.contains(&message),
            "{message} missing: {messages:?}"
        );
    }

    assert_eq!(details.dependency, ["google/protobuf/duration.proto"]);
    for import in &details.dependency {
        let MessageResponse::FileDescriptorResponse(files) = ask(
            app.grpc_addr,
            MessageRequest::FileByFilename(import.clone()),
        )
        .await
        else {
            panic!("{import} is not served");
        };
        let file =
            prost_types::FileDescriptorProto::decode(files.file_descriptor_proto[0].as_slice())
                .unwrap();
        assert_eq!(file.name(), import);
    }
}

/// Runs buf in the workspace with `args`; panics with its findings unless it passes.
fn buf_passes(buf: &std::path::Path, args: &[&str]) {
    let out = std::process::Command::new(buf)
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", buf.display()));
    assert!(
        out.status.success(),
        "buf {} failed:\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The contract keeps buf's STANDARD rules (the exceptions are listed, with their reasons, in
/// buf.yaml) and breaks nothing a caller built against the released contract
/// (proto/released.binpb) relies on: wire, JSON names or generated code.
#[test]
fn the_contract_passes_buf_lint_and_breaks_nothing_released() {
    let Some(buf) = common::installed_tool("buf", "pip install buf-bin==1.75.0") else {
        return;
    };
    buf_passes(&buf, &["lint"]);
    buf_passes(&buf, &["breaking", "--against", "proto/released.binpb"]);
}
