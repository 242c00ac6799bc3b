// Package etcdstore is Granary's etcd-backed core.PackageManager: packages
// are directory trees under a shared root (NFS in production), and etcd
// decides who builds, who holds what, and when a tree may go.
//
// # Who owns what
//
// A Store is one participant (one host process). It owns one etcd lease
// (its session); every reference and lock it takes hangs off that lease, so
// when the process dies its references vanish after the lease TTL, and when
// it calls Close they vanish at once. A Store watches its own keep-alive
// acknowledgements and treats the lease as lost before the server can expire
// it: builds in progress are cancelled (their publish is fenced anyway), a
// new lease is made with exponential back-off, and held references are taken
// again on it (EventRefLost reports the ones whose package is gone).
//
// # Keys
//
// Under the prefix P (default "/granary/"):
//
//	P/avail/<id>                    the package is published (JSON PackageRecord)
//	P/build/<id>                    a build attempt (JSON BuildRecord), on the builder's lease
//	P/ref/<id>/<lease-hex>/<n>      one reference, on the holder's lease
//	P/atime/<id>                    last access, unix nanoseconds
//	P/lock/<id>/<lease-hex>         the package's build/remove lock (etcd Mutex layout; value: who queues)
//	P/gc/<lease-hex>                the collector lock
//	P/root                          the identity of the prefix's shared root (JSON RootRecord); see binding.go
//	P/failed/<id>                   the last failed attempt (JSON FailureRecord), on a lease of TTL = retention
//
// WatchCluster decodes changes of these keys into ClusterEvents.
//
// See docs/design.md in the repository for the protocols and why each
// transaction compares what it compares.
package etcdstore
