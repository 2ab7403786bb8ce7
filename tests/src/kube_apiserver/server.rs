//! Listening and serving: the socket (created inside a network namespace when asked), the TLS
//! handshake, HTTP/1.1 connections, and stopping all of it at once.

use super::{http, Shared};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::runtime::Runtime;
use tokio::sync::oneshot;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

/// Binds `addr`, inside the network namespace at `netns` when given. `setns` moves only the
/// calling thread, so a short-lived thread enters the namespace and binds; the socket stays in
/// the namespace it was created in wherever it is used afterwards.
pub fn bind(netns: Option<&Path>, addr: SocketAddr) -> io::Result<TcpListener> {
    let Some(netns) = netns else {
        return TcpListener::bind(addr);
    };
    let ns = std::fs::File::open(netns)?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: setns on an open namespace file; it affects only this thread.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                TcpListener::bind(addr)
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the thread binding in the namespace panicked")))
    })
}

/// A listener being served; [`Running::stop`] ends it.
pub struct Running {
    stop: oneshot::Sender<()>,
    done: std::sync::mpsc::Receiver<()>,
}

impl Running {
    /// Serves `listener` on `rt` until stopped.
    pub fn spawn(rt: &Runtime, shared: Arc<Shared>, listener: TcpListener, tls: TlsAcceptor) -> io::Result<Running> {
        listener.set_nonblocking(true)?;
        let listener = {
            let _in_runtime = rt.enter();
            tokio::net::TcpListener::from_std(listener)?
        };
        let (stop, stop_rx) = oneshot::channel();
        let (done_tx, done) = std::sync::mpsc::channel();
        rt.spawn(async move {
            accept(shared, listener, tls, stop_rx).await;
            let _ = done_tx.send(());
        });
        Ok(Running { stop, done })
    }

    /// Closes the listener and every connection (no TLS close_notify, no HTTP goodbye: clients
    /// see what a killed server gives them), and returns once they are closed. It waits on a
    /// plain channel, so it may be called from inside another tokio runtime.
    pub fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.done.recv();
    }
}

async fn accept(
    shared: Arc<Shared>,
    listener: tokio::net::TcpListener,
    tls: TlsAcceptor,
    mut stop: oneshot::Receiver<()>,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => {
                    shared.log().connection();
                    connections.spawn(connection(shared.clone(), tls.clone(), tcp));
                }
                // Out of file descriptors and the like: wait a little rather than spin.
                Err(e) => {
                    eprintln!("stand-in kube-apiserver: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
        while connections.try_join_next().is_some() {}
    }
    drop(listener);
    connections.shutdown().await;
}

async fn connection(shared: Arc<Shared>, tls: TlsAcceptor, tcp: TcpStream) {
    let _ = tcp.set_nodelay(true);
    let stream = match tls.accept(tcp).await {
        Ok(s) => s,
        Err(e) => {
            if shared.options.verbose {
                eprintln!("stand-in kube-apiserver: TLS handshake: {e}");
            }
            return;
        }
    };
    let service = service_fn(move |req| http::serve(shared.clone(), req));
    // A connection error (the client went away mid-request) ends only this connection.
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .await;
}
