//! End-to-end tests over real loopback sockets: the `tickshard` binary with 2 shards and
//! clients on stock `quinn` (tokio).

mod common;

use common::{QuinnClient, Server};

#[tokio::test(flavor = "current_thread")]
async fn connect_hello_join() {
    let server = Server::start("hello", &["--shards", "2"]);
    let mut c = QuinnClient::connect(&server).await;
    let (player, _shard) = c.hello().await;
    assert_ne!(player, 0);
    let (room, _, entity) = c.join(0).await;
    assert_ne!(room, 0);
    assert_ne!(entity, 0);
}
