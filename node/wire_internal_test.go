package node

import (
	"encoding/json"
	"errors"
	"reflect"
	"testing"
	"time"

	"github.com/granary-build/granary/agent"
	"github.com/granary-build/granary/etcdstore"
)

// The wire types of package agent carry etcdstore's records field for
// field: a field added on one side only fails here.
func TestWireTypesMatchStore(t *testing.T) {
	now := time.Date(2026, 12, 6, 1, 2, 3, 4, time.UTC)
	pkg := &etcdstore.PackageRecord{BuiltBy: "h", PID: 1, BuiltAt: now, BuildSeconds: 1.5, Size: 2, Digest: "sha256:x", FromCache: true, Attempt: 3, Entries: 4, Needs: []string{"n1", "n2"}}
	info := etcdstore.Info{ID: "p", State: etcdstore.StateFailed, OutputDir: "/o", LogDir: "/l", Package: pkg,
		Build: &etcdstore.BuildRecord{State: "failed", Host: "h", PID: 5, Started: now, LogDir: "/l", Attempt: 6, Error: "e", Command: "c"},
		Refs:  []etcdstore.RefInfo{{Host: "h", PID: 7, Since: now, Purpose: "p", Lease: "1f", Cached: true, Holders: 8, HoldersAt: now, Pods: []string{"ns/pod"}}},
		ATime: now, NeededBy: []string{"d"},
		Pin:         &etcdstore.PinRecord{By: "u", Host: "h", At: now, Until: now, Note: "n"},
		Invalid:     &etcdstore.InvalidRecord{By: "u", Host: "h", At: now, Reason: "r", Cause: "c", Digest: "d", Attempt: 1},
		Invalidated: &etcdstore.InvalidRecord{By: "u", Host: "h", At: now, Reason: "r", Removed: now}}
	why := &etcdstore.Why{ID: "p", State: etcdstore.StateAvailable, Refs: info.Refs, Pin: info.Pin, Build: info.Build,
		GraceUntil: now, Invalid: info.Invalid, Alive: true,
		NeededBy: []*etcdstore.Why{{ID: "d", Refs: []etcdstore.RefInfo{}}, {ID: "e", Seen: true}}}
	rep := etcdstore.InvalidateReport{Invalidated: []string{"d", "p"}, Removed: []string{"d"}, Held: []string{"p"}}
	out := etcdstore.Outcome{How: etcdstore.Waited, Package: pkg, LogDir: "/l", Waited: time.Second, Elapsed: 2 * time.Second}
	for _, tc := range []struct {
		name       string
		store, got any
	}{
		{"Info", info, StoreInfo(recast[agent.Info](info))},
		{"Outcome", out, StoreOutcome(recast[agent.Outcome](out))},
		{"Why", why, recast[etcdstore.Why](recast[agent.Why](why))},
		{"InvalidateReport", rep, recast[etcdstore.InvalidateReport](recast[agent.InvalidateReport](rep))},
		{"PinRecord", *info.Pin, recast[etcdstore.PinRecord](recast[agent.PinRecord](*info.Pin))},
	} {
		want, _ := json.Marshal(tc.store)
		wire, _ := json.Marshal(tc.got)
		if string(want) != string(wire) {
			t.Errorf("%s through the wire:\n got %s\nwant %s", tc.name, wire, want)
		}
	}
	e := etcdstore.Event{Kind: etcdstore.EventWaiting, ID: "p", Time: now, Host: "h", PID: 1, Since: now, LogDir: "/l", Elapsed: 3, Size: 4, Digest: "d", Err: errors.New("x")}
	if got := StoreEvent(*wireEvent(e)); got.Err.Error() != "x" || got.Kind != e.Kind || got.Since != e.Since || got.Digest != e.Digest {
		t.Errorf("event through the wire = %+v, want %+v", got, e)
	}
	for _, k := range []struct {
		wire  agent.EventKind
		store etcdstore.EventKind
	}{
		{agent.EventWaiting, etcdstore.EventWaiting}, {agent.EventLockDelay, etcdstore.EventLockDelay},
		{agent.EventCacheHit, etcdstore.EventCacheHit}, {agent.EventPublished, etcdstore.EventPublished},
		{agent.EventFailed, etcdstore.EventFailed}, {agent.EventCacheUploadFailed, etcdstore.EventCacheUploadFailed},
		{agent.EventCacheStored, etcdstore.EventCacheStored}, {agent.EventCacheMiss, etcdstore.EventCacheMiss},
		{agent.EventLastFailed, etcdstore.EventLastFailed}, {agent.EventWaitInvalid, etcdstore.EventWaitInvalid},
	} {
		if int(k.wire) != int(k.store) {
			t.Errorf("agent's %d is etcdstore's %v (%d)", k.wire, k.store, k.store)
		}
	}
	for _, h := range []struct {
		wire  agent.How
		store etcdstore.How
	}{{agent.AlreadyAvailable, etcdstore.AlreadyAvailable}, {agent.Built, etcdstore.Built}, {agent.FromCache, etcdstore.FromCache}, {agent.Waited, etcdstore.Waited}} {
		if int(h.wire) != int(h.store) {
			t.Errorf("agent.How %d is etcdstore's %v", h.wire, h.store)
		}
	}
}

// The store's sentinels cross the socket as the wire's, and come back.
func TestStoreSentinelsCrossTheWire(t *testing.T) {
	for _, s := range storeSentinels {
		m := agent.Msg{Err: "x", Codes: wireCodes(s.store)}
		if err := builderErr(&m); !errors.Is(err, s.store) || !errors.Is(err, s.wire) {
			t.Errorf("%v through the wire = %v (codes %v); want both sentinels", s.store, err, m.Codes)
		}
	}
}

// TestWireTypesHaveStoreFields: every field of a store type that crosses
// the wire has a field of the same name and JSON tag in its agent copy, so
// a field added to one side alone fails here rather than vanishing on the
// wire.
func TestWireTypesHaveStoreFields(t *testing.T) {
	for _, pair := range [][2]reflect.Type{
		{reflect.TypeFor[etcdstore.Info](), reflect.TypeFor[agent.Info]()},
		{reflect.TypeFor[etcdstore.RefInfo](), reflect.TypeFor[agent.RefInfo]()},
		{reflect.TypeFor[etcdstore.PackageRecord](), reflect.TypeFor[agent.PackageRecord]()},
		{reflect.TypeFor[etcdstore.BuildRecord](), reflect.TypeFor[agent.BuildRecord]()},
		{reflect.TypeFor[etcdstore.PinRecord](), reflect.TypeFor[agent.PinRecord]()},
		{reflect.TypeFor[etcdstore.InvalidRecord](), reflect.TypeFor[agent.InvalidRecord]()},
		{reflect.TypeFor[etcdstore.Why](), reflect.TypeFor[agent.Why]()},
		{reflect.TypeFor[etcdstore.InvalidateReport](), reflect.TypeFor[agent.InvalidateReport]()},
	} {
		store, wire := pair[0], pair[1]
		for i := range store.NumField() {
			f := store.Field(i)
			if !f.IsExported() {
				continue
			}
			w, ok := wire.FieldByName(f.Name)
			if !ok || w.Tag.Get("json") != f.Tag.Get("json") {
				t.Errorf("%s.%s (json %q) has no twin in %s", store, f.Name, f.Tag.Get("json"), wire)
			}
		}
	}
}
