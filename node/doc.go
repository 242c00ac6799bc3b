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
// directory, never on the shared root. Such a node holds the state
// directory's lock file for its lifetime, so one state directory has at most
// one node, writes node.json there once it serves (read it with ReadLocal),
// and may exit after an idle period without clients.
//
// Config follows etcd's embed.Config: DefaultConfig, then FromEnv and
// RegisterFlags, then Validate. A bad value is an error, never a fallback.
package node
