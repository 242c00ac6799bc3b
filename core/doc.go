// Package core is Granary's contract: the PackageManager and PackageHandler
// interfaces (named after LUCI cipkg's, so code written against cipkg can
// swap in Granary), the sentinel errors callers test with errors.Is, and the
// rules for package IDs.
//
// core imports nothing but the standard library. Implementations live
// elsewhere (etcdstore is the etcd-backed one) and prove themselves with the
// conformance suite in core/coretest.
//
// Capabilities beyond the cipkg contract are small optional interfaces found
// by type assertion, the way io/fs adds StatFS to FS: a handler that can take
// a context implements ContextHandler, one whose packages can be built on
// other packages implements NeedsHandler.
package core
