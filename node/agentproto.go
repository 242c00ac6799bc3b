package node

import (
	"context"
	"errors"
	"time"

	"github.com/granary-build/granary/core"
	"github.com/granary-build/granary/etcdstore"
)

// The host agent's protocol: JSON lines over the unix socket
// <state>/agent.sock, one msg per line in each direction. A request carries
// a sequence number chosen by the client; the node answers it with op
// "reply" and the same number, in any order (slow requests do not hold up
// fast ones). The node also sends, unasked, "build_now" / "build_stop"
// for a build request whose builder must run or stop in the caller's
// process, and notices ("ref_lost", "lease_lost", "lease_restored").
// docs/design.md says why JSON lines and not gRPC.
const agentProtoVersion = 1

// Operations.
const (
	opHello     = "hello"        // client → node: purpose; reply: helloInfo
	opIncRef    = "incref"       // ID
	opDecRef    = "decref"       // ID
	opTryRemove = "tryremove"    // ID; reply OK says whether it was removed
	opBuild     = "build"        // ID; reply when the build settled
	opCancel    = "cancel"       // Seq of a build request the caller gave up
	opBuilt     = "built"        // Seq of a build request: the builder's result (Err, Codes)
	opBuilderPG = "builder_pgid" // Seq of a build request: its builder runs in process group PID
	opInspect   = "inspect"      // ID; reply Info and Holders
	opBye       = "bye"          // client → node: release everything; reply, then the client closes
	opReply     = "reply"        // node → client: the answer to Seq
	opBuildNow  = "build_now"    // node → client: run the builder of build request Seq
	opBuildStop = "build_stop"
	opRefLost   = "ref_lost" // node → client: the host's reference to ID is gone with the package
	opLeaseLost = "lease_lost"
	opLeaseBack = "lease_restored"
	opEvent     = "event" // node → client: a store event about a package the client is building
)

// msg is every message, in both directions. Unused fields are omitted.
type msg struct {
	Op      string             `json:"op"`
	Seq     uint64             `json:"seq,omitempty"`
	ID      string             `json:"id,omitempty"`
	Purpose string             `json:"purpose,omitempty"`
	PID     int                `json:"pid,omitempty"`
	OK      bool               `json:"ok,omitempty"`
	Err     string             `json:"err,omitempty"`
	Codes   []string           `json:"codes,omitempty"` // sentinels the error wraps
	Hello   *helloInfo         `json:"hello,omitempty"`
	Info    *etcdstore.Info    `json:"info,omitempty"`
	Holders []Holder           `json:"holders,omitempty"`
	Event   *wireEvent         `json:"event,omitempty"`
	Outcome *etcdstore.Outcome `json:"outcome,omitempty"`
}

// wireEvent is an etcdstore.Event on the wire.
type wireEvent struct {
	Kind    etcdstore.EventKind `json:"kind"`
	ID      string              `json:"id"`
	Time    time.Time           `json:"time"`
	Host    string              `json:"host,omitempty"`
	PID     int                 `json:"pid,omitempty"`
	Since   time.Time           `json:"since,omitzero"`
	LogDir  string              `json:"log_dir,omitempty"`
	Elapsed time.Duration       `json:"elapsed,omitempty"`
	Size    int64               `json:"size,omitempty"`
	Digest  string              `json:"digest,omitempty"`
	Err     string              `json:"err,omitempty"`
}

func toWire(e etcdstore.Event) *wireEvent {
	w := &wireEvent{Kind: e.Kind, ID: e.ID, Time: e.Time, Host: e.Host, PID: e.PID, Since: e.Since,
		LogDir: e.LogDir, Elapsed: e.Elapsed, Size: e.Size, Digest: e.Digest}
	if e.Err != nil {
		w.Err = e.Err.Error()
	}
	return w
}

func (w *wireEvent) event() etcdstore.Event {
	e := etcdstore.Event{Kind: w.Kind, ID: w.ID, Time: w.Time, Host: w.Host, PID: w.PID, Since: w.Since,
		LogDir: w.LogDir, Elapsed: w.Elapsed, Size: w.Size, Digest: w.Digest}
	if w.Err != "" {
		e.Err = errors.New(w.Err)
	}
	return e
}

// helloInfo is the node's side of the handshake.
type helloInfo struct {
	Version int    `json:"version"`
	Host    string `json:"host"`
	PID     int    `json:"pid"`
	Root    string `json:"root"`
	Prefix  string `json:"prefix"`
	UID     int    `json:"uid"` // the caller's, as the node saw it
	// Linger is the node's: how long it keeps a package's etcd reference
	// after its last local holder.
	Linger time.Duration `json:"linger"`
}

// Holder is one local reference held through the node: the process that
// holds it (from SO_PEERCRED on its connection), since when, and the purpose
// its connection gave.
type Holder struct {
	UID     int       `json:"uid"`
	PID     int       `json:"pid"`
	Since   time.Time `json:"since"`
	Purpose string    `json:"purpose,omitempty"`
}

// wireCodes maps the sentinel errors that cross the socket to their names.
var wireCodes = []struct {
	name string
	err  error
}{
	{"invalid", core.ErrInvalidID},
	{"notexist", core.ErrPackageNotExist},
	{"buildfailed", core.ErrBuildFailed},
	{"noref", etcdstore.ErrNoRef},
	{"leaselost", etcdstore.ErrLeaseLost},
	{"fenced", etcdstore.ErrFenced},
	{"abandon", etcdstore.ErrAbandon},
	{"closed", etcdstore.ErrClosed},
	{"canceled", context.Canceled},
	{"deadline", context.DeadlineExceeded},
}

// errCodes lists the names of the sentinels err wraps.
func errCodes(err error) []string {
	var out []string
	for _, c := range wireCodes {
		if errors.Is(err, c.err) {
			out = append(out, c.name)
		}
	}
	return out
}

// RemoteError is an error that crossed the node's socket: its message as
// the node (or the builder's process) wrote it, and the sentinels it
// wrapped there, so errors.Is(err, core.ErrPackageNotExist) and the like
// work on the client as they do in process. A failed build whose builder
// ran in this process also wraps the builder's own error.
type RemoteError struct {
	Msg   string
	Codes []string
	own   error
}

func (e *RemoteError) Error() string { return e.Msg }

// Unwrap returns the sentinels named by Codes and, for a build, the error
// of the builder that ran in this process.
func (e *RemoteError) Unwrap() []error {
	var out []error
	for _, name := range e.Codes {
		for _, c := range wireCodes {
			if c.name == name {
				out = append(out, c.err)
			}
		}
	}
	if e.own != nil {
		out = append(out, e.own)
	}
	return out
}

// remoteErr rebuilds an error from a message's Err and Codes (nil if none).
func remoteErr(m msg) error {
	if m.Err == "" && len(m.Codes) == 0 {
		return nil
	}
	return &RemoteError{Msg: m.Err, Codes: m.Codes}
}
