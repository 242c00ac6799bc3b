package node

import (
	"context"
	"encoding/json"
	"errors"
	"time"

	"github.com/granary-build/granary/core"
	"github.com/granary-build/granary/etcdstore"
	"github.com/granary-build/granary/internal/agentwire"
)

// The host agent's protocol is package internal/agentwire (JSON lines over
// <state>/agent.sock); msg adds to its Msg the fields that carry etcdstore's
// types.
const agentProtoVersion = agentwire.Version

// Operations (agentwire's).
const (
	opHello     = agentwire.OpHello
	opIncRef    = agentwire.OpIncRef
	opDecRef    = agentwire.OpDecRef
	opTryRemove = agentwire.OpTryRemove
	opBuild     = agentwire.OpBuild
	opCancel    = agentwire.OpCancel
	opBuilt     = agentwire.OpBuilt
	opBuilderPG = agentwire.OpBuilderPG
	opInspect   = agentwire.OpInspect
	opBye       = agentwire.OpBye
	opReply     = agentwire.OpReply
	opBuildNow  = agentwire.OpBuildNow
	opBuildStop = agentwire.OpBuildStop
	opRefLost   = agentwire.OpRefLost
	opLeaseLost = agentwire.OpLeaseLost
	opLeaseBack = agentwire.OpLeaseBack
	opEvent     = agentwire.OpEvent
)

// msg is every message, in both directions: agentwire's fields, flattened
// on the wire, plus those of etcdstore's types. Unused fields are omitted.
type msg struct {
	agentwire.Msg
	Info    *etcdstore.Info    `json:"info,omitempty"`
	Event   *wireEvent         `json:"event,omitempty"`
	Outcome *etcdstore.Outcome `json:"outcome,omitempty"`
}

// appendMsg appends m as one line, by hand (agentwire.AppendMsg) when it
// carries only agentwire's fields: the hot path's messages do.
func appendMsg(b []byte, m *msg) []byte {
	if m.Info == nil && m.Event == nil && m.Outcome == nil {
		return agentwire.AppendMsg(b, &m.Msg)
	}
	j, err := json.Marshal(m)
	if err != nil { // cannot happen: msg has only marshalable fields
		panic(err)
	}
	return append(append(b, j...), '\n')
}

// decodeMsg decodes one line into m, by hand when it is flat.
func decodeMsg(line []byte, m *msg) error {
	*m = msg{}
	if agentwire.DecodeMsg(line, &m.Msg) {
		return nil
	}
	*m = msg{} // drop what the fast path read before it gave up
	return json.Unmarshal(line, m)
}

// wire returns a msg of agentwire's fields only.
func wire(m agentwire.Msg) msg { return msg{Msg: m} }

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
type helloInfo = agentwire.Hello

// Holder is one local reference held through the node: the process that
// holds it (from SO_PEERCRED on its connection), since when, and the purpose
// its connection gave.
type Holder = agentwire.Holder

// wireCodes maps the sentinel errors that cross the socket to their names.
var wireCodes = []struct {
	name string
	err  error
}{
	{agentwire.CodeInvalid, core.ErrInvalidID},
	{agentwire.CodeNotExist, core.ErrPackageNotExist},
	{agentwire.CodeBuildFailed, core.ErrBuildFailed},
	{agentwire.CodeNoRef, etcdstore.ErrNoRef},
	{agentwire.CodeLeaseLost, etcdstore.ErrLeaseLost},
	{agentwire.CodeFenced, etcdstore.ErrFenced},
	{agentwire.CodeAbandon, etcdstore.ErrAbandon},
	{agentwire.CodeClosed, etcdstore.ErrClosed},
	{agentwire.CodeCanceled, context.Canceled},
	{agentwire.CodeDeadline, context.DeadlineExceeded},
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
func remoteErr(m agentwire.Msg) error {
	if m.Err == "" && len(m.Codes) == 0 {
		return nil
	}
	return &RemoteError{Msg: m.Err, Codes: m.Codes}
}
