package cli

import (
	"errors"
	"fmt"
	"strings"

	"github.com/granary-build/granary/etcdstore"
)

// plainErr renders err for a person at a terminal: the store's errors
// mapped to plain sentences, and no package prefixes ("etcdstore: ",
// a second "granary: ") in the middle of the line. The error values
// themselves keep their prefixes for programs that log them.
func plainErr(err error) string {
	if err == nil {
		return ""
	}
	msg := err.Error()
	var be *etcdstore.BuildError
	if errors.As(err, &be) {
		msg = strings.Replace(msg, be.Error(), plainBuildError(be), 1)
	}
	var nsr *etcdstore.NotSharedRootError
	if errors.As(err, &nsr) {
		msg = strings.Replace(msg, nsr.Error(), plainNotShared(nsr), 1)
	}
	var pe *etcdstore.PanicError
	if errors.As(err, &pe) {
		// Whatever wrapped it quoted it in one line; keep it so.
		msg = strings.Replace(msg, pe.Error(), pe.Error()+" (stack in the log)", 1)
	}
	for _, known := range []struct {
		err  error
		said string
	}{
		{etcdstore.ErrLeaseLost, "the lease with etcd was lost"},
		{etcdstore.ErrFenced, "the build lock was lost before publishing"},
		{etcdstore.ErrClosed, "the store was closed"},
		{etcdstore.ErrCollectorBusy, "another collector is sweeping"},
	} {
		if errors.Is(err, known.err) {
			msg = strings.ReplaceAll(msg, known.err.Error(), known.said)
		}
	}
	// etcd's own words for a lost quorum, met in the middle of a command
	// (at the start, node.Dial names it and the member that answered).
	msg = strings.ReplaceAll(msg, "etcdserver: no leader", "etcd has no leader: quorum lost (a majority of the etcd members must be up)")
	msg = strings.ReplaceAll(msg, "etcdstore: ", "")
	// One "granary: " at the start at most.
	rest, had := strings.CutPrefix(msg, "granary: ")
	rest = strings.ReplaceAll(rest, ": granary: ", ": ")
	rest = strings.ReplaceAll(rest, "granary: ", "")
	if had {
		return "granary: " + rest
	}
	return rest
}

// plainBuildError says who failed and where the logs are.
func plainBuildError(be *etcdstore.BuildError) string {
	cause := "failed"
	if be.Err != nil {
		cause = be.Err.Error()
	}
	return fmt.Sprintf("build %q failed on %s (pid %d): %s (logs in %s)", be.ID, be.Host, be.PID, cause, be.LogDir)
}

// plainNotShared is the refusal of a root that is not the prefix's shared
// root, for a CLI user: what is wrong, where the shared root is, and the
// command that makes this one the shared root (not the library's option).
func plainNotShared(e *etcdstore.NotSharedRootError) string {
	msg := fmt.Sprintf("not the shared root of this prefix: %s; the shared root of prefix %q is %s (bound by %s). Is the shared volume mounted? To make %s the new shared root: granary init-root --root %s",
		e.What, e.Prefix, e.Shared.Path, e.Shared.Host, e.Root, e.Root)
	if e.Waited > 0 {
		msg += fmt.Sprintf(" (looked for it again for %v: this host's view of the volume may be stale; see \"Running on NFS\" in the README)", e.Waited)
	}
	return msg
}
