package cli

import (
	"errors"
	"fmt"
	"strings"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"

	"github.com/granary-build/granary/etcdstore"
)

// Message is what main prints for err ("" for nothing): one line, starting
// with "granary".
func Message(err error) string {
	var ee *ExitErr
	if err == nil || (errors.As(err, &ee) && ee.Err == nil) {
		return ""
	}
	msg := plainErr(err)
	if !strings.HasPrefix(msg, "granary") {
		msg = "granary: " + msg
	}
	return msg
}

// plainErr renders err for a person at a terminal: its message, with the
// text of each error of sentences that it wraps said in plain words.
// Errors carry no package prefixes (core/errors.go), so nothing else
// changes.
func plainErr(err error) string {
	if err == nil {
		return ""
	}
	msg := err.Error()
	for _, s := range sentences {
		if text, said, ok := s(err); ok {
			msg = strings.ReplaceAll(msg, text, said)
		}
	}
	return msg
}

// A sentence finds one error in err's chain and returns its text and what
// a person is told instead.
type sentence func(err error) (text, said string, ok bool)

// sentences are the errors people meet, in plain words. A BuildError comes
// before the PanicError it may wrap: its sentence quotes its cause's text.
var sentences = []sentence{
	typed(plainBuildError),
	typed(plainNotShared),
	// Whatever wrapped it quoted it in one line; keep it so.
	typed(func(pe *etcdstore.PanicError) string { return pe.Error() + " (stack in the log)" }),
	sentinel(etcdstore.ErrLeaseLost, "the lease with etcd was lost"),
	sentinel(etcdstore.ErrFenced, "the build lock was lost before publishing"),
	sentinel(etcdstore.ErrClosed, "the store was closed"),
	sentinel(etcdstore.ErrCollectorBusy, "another collector is sweeping"),
	// etcd's own words for a lost quorum, met in the middle of a command
	// (at the start, node.Dial names it and the member that answered).
	sentinel(rpctypes.ErrNoLeader, "etcd has no leader: quorum lost (a majority of the etcd members must be up)"),
}

// sentinel is the sentence for the errors that wrap target.
func sentinel(target error, said string) sentence {
	return func(err error) (string, string, bool) {
		return target.Error(), said, errors.Is(err, target)
	}
}

// typed is the sentence for the errors of type E, said by say.
func typed[E error](say func(E) string) sentence {
	return func(err error) (string, string, bool) {
		e, ok := errors.AsType[E](err)
		if !ok {
			return "", "", false
		}
		return e.Error(), say(e), true
	}
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
