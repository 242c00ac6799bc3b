// Package node is one host's membership of a Granary cluster.
//
// A Node owns, for its lifetime: an etcd client (TLS, user and password,
// HTTP/2 keep-alive pings), the etcdstore.Store of this host, a
// registration key P/node/<name>/<lease> on a lease of its own, the GC loop (one
// Prune per interval; only one collector sweeps at a time cluster-wide, so
// etcdstore.ErrCollectorBusy is normal), and an HTTP server with
// Prometheus metrics, /healthz and /readyz. Run(ctx) runs it and shuts it
// down in a documented order.
//
// With no endpoints configured (the embedded default), the node also runs a
// single-member etcd whose data and client socket live in a host-local state
// directory, never on the shared root. Such a node writes node.json there
// once it serves (read it with ReadLocal), and may exit after an idle period
// without clients (a connection to its local API counts as one).
//
// Every node serves the host's processes on a unix socket in the state
// directory (<state>/agent.sock; it holds the state directory's lock in
// every mode): the local API. agent.Connect returns an agent.Conn, a
// core.PackageManager whose references the node holds for the connection's
// lifetime and aggregates into one etcd reference per package for the whole
// host (released after the last local holder plus Config.Linger), and whose
// builds run one attempt per package on the host, with the builder in the
// caller's process. The node owns the connections and their references;
// a Conn owns only its socket. LocalAPI serves the same API for a store
// outside a Node.
//
// Config follows etcd's embed.Config: DefaultConfig, then FromEnv and
// RegisterFlags, then Validate. A bad value is an error, never a fallback.
package node
