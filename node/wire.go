package node

import (
	"encoding/json"
	"errors"
	"fmt"

	"github.com/granary-build/granary/agent"
	"github.com/granary-build/granary/etcdstore"
)

// The protocol of the local API is package agent's; this file converts
// between its wire types and etcdstore's.

// Holder is one local reference held through the node (agent.Holder).
type Holder = agent.Holder

// storeSentinels pairs the store's sentinels with the wire's (agent's), for
// the sentinels that are not the same value on both sides (core's are).
var storeSentinels = []struct{ store, wire error }{
	{etcdstore.ErrLeaseLost, agent.ErrLeaseLost},
	{etcdstore.ErrFenced, agent.ErrFenced},
	{etcdstore.ErrAbandon, agent.ErrAbandoned},
	{etcdstore.ErrClosed, agent.ErrClosed},
}

// wireCodes lists the codes of the sentinels err wraps, on either side.
func wireCodes(err error) []string {
	codes := agent.Codes(err)
	for _, s := range storeSentinels {
		if errors.Is(err, s.store) {
			codes = append(codes, agent.Codes(s.wire)...)
		}
	}
	return codes
}

// storeErr is an error that crossed the socket, made to wrap the store's
// sentinels as well as the wire's.
type storeErr struct{ err error }

func (e *storeErr) Error() string { return e.err.Error() }

func (e *storeErr) Unwrap() []error {
	out := []error{e.err}
	for _, s := range storeSentinels {
		if errors.Is(e.err, s.wire) {
			out = append(out, s.store)
		}
	}
	return out
}

// StoreError makes an error of an agent.Conn (which wraps agent's
// sentinels) also wrap etcdstore's counterparts (ErrLeaseLost, ErrFenced,
// ErrAbandon, ErrClosed), for code that checks an agent's and a store's
// errors alike. Nil stays nil.
func StoreError(err error) error {
	if err == nil {
		return nil
	}
	return &storeErr{err}
}

// builderErr is the error a builder in the caller's process returned
// (OpBuilt), wrapping the store's sentinels it named.
func builderErr(m *agent.Msg) error {
	err := agent.ErrorOf(m)
	if err == nil {
		return nil
	}
	return StoreError(err)
}

// wireEvent is e's wire form.
func wireEvent(e etcdstore.Event) *agent.Event {
	w := &agent.Event{Kind: agent.EventKind(e.Kind), ID: e.ID, Time: e.Time, Host: e.Host, PID: e.PID, Since: e.Since,
		LogDir: e.LogDir, Elapsed: e.Elapsed, Size: e.Size, Digest: e.Digest}
	if e.Err != nil {
		w.Err = e.Err.Error()
	}
	return w
}

// StoreEvent is the etcdstore.Event an agent.Event carries.
func StoreEvent(w agent.Event) etcdstore.Event {
	e := etcdstore.Event{Kind: etcdstore.EventKind(w.Kind), ID: w.ID, Time: w.Time, Host: w.Host, PID: w.PID, Since: w.Since,
		LogDir: w.LogDir, Elapsed: w.Elapsed, Size: w.Size, Digest: w.Digest}
	if w.Err != "" {
		e.Err = errors.New(w.Err)
	}
	return e
}

// StoreOutcome is the etcdstore.Outcome an agent.Outcome carries.
func StoreOutcome(o agent.Outcome) etcdstore.Outcome {
	return recast[etcdstore.Outcome](o)
}

// StoreInfo is the etcdstore.Info an agent.Info carries.
func StoreInfo(i agent.Info) etcdstore.Info { return recast[etcdstore.Info](i) }

// recast converts between a store type and its wire form through their
// JSON, which is the same (TestWireTypesMatchStore): the wire form exists
// so that package agent needs no etcdstore. Only inspections and build
// outcomes take it, not the hot path.
func recast[T any](v any) T {
	var out T
	b, err := json.Marshal(v)
	if err == nil {
		err = json.Unmarshal(b, &out)
	}
	if err != nil { // cannot happen: both sides are plain data of the same shape
		panic(fmt.Sprintf("node: cannot convert %T to %T: %v", v, out, err))
	}
	return out
}

// StoreWhy is the etcdstore.Why an agent.Why carries.
func StoreWhy(w agent.Why) *etcdstore.Why {
	out := recast[etcdstore.Why](w)
	return &out
}

// StorePin is the etcdstore.PinRecord an agent.PinRecord carries.
func StorePin(p agent.PinRecord) etcdstore.PinRecord { return recast[etcdstore.PinRecord](p) }

// StoreInvalidateReport is the etcdstore.InvalidateReport an
// agent.InvalidateReport carries.
func StoreInvalidateReport(r agent.InvalidateReport) etcdstore.InvalidateReport {
	return recast[etcdstore.InvalidateReport](r)
}
