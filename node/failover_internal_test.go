package node

import (
	"testing"
	"time"
)

// TestDialAddr: the watch finds a member's connections by the address gRPC
// dials, which the etcd client derives from the endpoint.
func TestDialAddr(t *testing.T) {
	for _, tt := range []struct{ ep, want string }{
		{"http://etcd1:2379", "etcd1:2379"},
		{"https://10.0.0.1:2379", "10.0.0.1:2379"},
		{"etcd1:2379", "etcd1:2379"},
		{"unix:///run/etcd.sock", "unix:///run/etcd.sock"},
		{"unixs:///run/etcd.sock", "unix:///run/etcd.sock"},
		{"unix://etcd.sock", "unix:etcd.sock"},
		{"unix:etcd.sock", "unix:etcd.sock"},
	} {
		if got := dialAddr(tt.ep); got != tt.want {
			t.Errorf("dialAddr(%q) = %q, want %q", tt.ep, got, tt.want)
		}
	}
}

// TestTimingFor: whatever the TTL, a frozen member is found, and a stalled
// keep-alive moved, before the guard's 2/3 TTL, with room for the etcd
// client's 0.5 s reconnect wait and 0.5 s send tick.
func TestTimingFor(t *testing.T) {
	for _, ttl := range []time.Duration{3 * time.Second, 5 * time.Second, 9 * time.Second, 15 * time.Second, 60 * time.Second, time.Hour} {
		w := timingFor(ttl)
		found := w.probeEvery + w.probeTimeout
		if found+time.Second >= ttl*2/3 {
			t.Errorf("TTL %v: a frozen member is found after up to %v; with 1 s to reconnect that is past the guard's %v", ttl, found, ttl*2/3)
		}
		// Due at TTL/3 (+0.5 s send tick), stalled, reopened 0.5 s later
		// and sent at once.
		if ttl >= 9*time.Second && ttl/3+500*time.Millisecond+w.stallAfter+500*time.Millisecond >= ttl*2/3 {
			t.Errorf("TTL %v: a renewal sent at TTL/3 and stalled for %v is renewed again past the guard's %v", ttl, w.stallAfter, ttl*2/3)
		}
		if w.probeTimeout < 400*time.Millisecond || w.stallAfter < time.Second {
			t.Errorf("TTL %v: probe deadline %v or stall %v too short for a loaded member", ttl, w.probeTimeout, w.stallAfter)
		}
	}
}
