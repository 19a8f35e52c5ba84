//! `h2-bridge --listen ADDR --to ADDR --ca PEM`: lets a WebSocket client that speaks
//! only HTTP/1.1 (Autobahn's fuzzing client) test a server's WebSockets over HTTP/2.
//! Each upgrade it takes is opened as an extended CONNECT stream (RFC 8441) on one
//! HTTP/2 connection to the server (over TLS, trusting `--ca`), answered 101 with the
//! server's choice of extensions, and then the frames pass both ways unchanged: what
//! the server's engine reads and writes is exactly what the client sent and gets.

use std::path::PathBuf;

use switchboard_net::wire::handshake::{accept_key, parse_request};
use switchboard_test_support::h2::H2;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;

fn usage() -> ! {
    eprintln!("usage: h2-bridge --listen ADDR --to ADDR --ca PEM");
    std::process::exit(2)
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let (mut listen, mut to, mut ca) = (None, None, None);
    while let Some(flag) = args.next() {
        let value = args.next().unwrap_or_else(|| usage());
        match flag.as_str() {
            "--listen" => listen = Some(value),
            "--to" => to = Some(value),
            "--ca" => ca = Some(PathBuf::from(value)),
            _ => usage(),
        }
    }
    let (Some(listen), Some(to), Some(ca)) = (listen, to, ca) else {
        usage()
    };
    let listener = TcpListener::bind(&listen)
        .await
        .expect("the listen address");
    eprintln!(
        "h2-bridge listening on {}",
        listener.local_addr().expect("bound")
    );
    let shared = std::sync::Arc::new(Mutex::new(H2::connect(&to, &ca).await));
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        let shared = shared.clone();
        let (to, ca) = (to.clone(), ca.clone());
        tokio::spawn(async move {
            if let Err(why) = bridge(client, &shared, &to, &ca).await {
                eprintln!("h2-bridge: {why}");
            }
        });
    }
}

async fn bridge(
    mut client: TcpStream,
    shared: &Mutex<H2>,
    to: &str,
    ca: &std::path::Path,
) -> Result<(), String> {
    client.set_nodelay(true).map_err(|e| e.to_string())?;
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    let (head, length) = loop {
        if let Some(parsed) = parse_request(&buffer, 16 * 1024).map_err(|e| e.to_string())? {
            break parsed;
        }
        let read = client.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if read == 0 {
            return Err("the client left during its handshake".into());
        }
        buffer.extend_from_slice(&chunk[..read]);
    };
    let header = |name: &str| {
        head.headers()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let key = header("sec-websocket-key");
    let extensions = header("sec-websocket-extensions");
    let mut headers = vec![("sec-websocket-version", "13")];
    if !extensions.is_empty() {
        headers.push(("sec-websocket-extensions", extensions.as_str()));
    }
    // One connection for every stream (a browser's way); a new one if it went.
    let mut h2 = shared.lock().await.clone();
    let (status, answer, stream) = match h2.try_connect_stream(&head.target, &headers).await {
        Ok(opened) => opened,
        Err(_) => {
            let fresh = H2::connect(to, ca).await;
            *shared.lock().await = fresh.clone();
            h2 = fresh;
            h2.try_connect_stream(&head.target, &headers)
                .await
                .map_err(|e| e.to_string())?
        }
    };
    let Some(mut stream) = stream else {
        let refusal =
            format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        let _ = client.write_all(refusal.as_bytes()).await;
        return Ok(());
    };
    let mut response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n",
        accept_key(key.trim().as_bytes())
    );
    if let Some(agreed) = answer
        .get("sec-websocket-extensions")
        .and_then(|v| v.to_str().ok())
    {
        response.push_str(&format!("Sec-WebSocket-Extensions: {agreed}\r\n"));
    }
    response.push_str("\r\n");
    client
        .write_all(response.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    stream
        .write_all(&buffer[length..])
        .await
        .map_err(|e| e.to_string())?;
    let _ = tokio::io::copy_bidirectional(&mut client, &mut stream).await;
    Ok(())
}
