package node

import (
	"bytes"
	"context"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/granary-build/granary/etcdstore"
	"github.com/granary-build/granary/internal/etcdtest"
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

// TestFailoverMinTTL: the rule behind the TTL guidance. A lease survives a
// frozen etcd member when the worst-case time without an acknowledgement
// (failoverNeeds) is shorter than the guard's 2/3 TTL; FailoverMinTTL is the
// shortest whole-second TTL for which that holds whichever member freezes,
// and every longer TTL passes too.
func TestFailoverMinTTL(t *testing.T) {
	keeps := func(ttl time.Duration, leader bool) bool { return failoverNeeds(ttl, leader) < ttl*2/3 }
	for ttl := etcdstore.MinTTL; ttl <= 5*time.Minute; ttl += time.Second {
		if got, want := keeps(ttl, false) && keeps(ttl, true), ttl >= FailoverMinTTL; got != want {
			t.Errorf("TTL %v: survives any frozen member = %v, want %v (FailoverMinTTL %v); needs %v (follower) / %v (leader) against %v",
				ttl, got, want, FailoverMinTTL, failoverNeeds(ttl, false), failoverNeeds(ttl, true), ttl*2/3)
		}
	}
	// The figures docs/design.md and the README quote.
	s := time.Second
	ms := time.Millisecond
	tests := []struct {
		name             string
		ttl              time.Duration
		follower, leader time.Duration // failoverNeeds, rounded to 10 ms
	}{
		{"TTL 5 s: even a frozen follower can cost the lease", 5 * s, 4170 * ms, 6170 * ms},
		{"TTL 8 s: the shortest a frozen follower leaves alone", 8 * s, 5170 * ms, 7170 * ms},
		{"TTL 9 s (the frozen-member test): a leader freeze can cost a second stall", 9 * s, 5500 * ms, 7500 * ms},
		{"TTL 13 s: the retry may still come before the election", 13 * s, 7280 * ms, 9280 * ms},
		{"TTL 14 s: the retry comes after the election", 14 * s, 7720 * ms, 7720 * ms},
		{"TTL 15 s (default)", 15 * s, 8170 * ms, 8170 * ms},
		{"TTL 60 s: stallAfter capped at 5 s", 60 * s, 26500 * ms, 26500 * ms},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f, l := failoverNeeds(tt.ttl, false).Round(10*ms), failoverNeeds(tt.ttl, true).Round(10*ms)
			if f != tt.follower || l != tt.leader {
				t.Errorf("needs %v (follower) / %v (leader), want %v / %v", f, l, tt.follower, tt.leader)
			}
			t.Logf("guard %v: follower %v, leader %v", tt.ttl*2/3, f, l)
		})
	}
}

// TestTTLWarning: the warning is for a node with other members to fail
// over to and a TTL below FailoverMinTTL, and says which freeze it fears.
func TestTTLWarning(t *testing.T) {
	three := []string{"http://e1:2379", "http://e2:2379", "http://e3:2379"}
	tests := []struct {
		name      string
		endpoints []string
		ttl       time.Duration
		want      []string // substrings; none: no warning
	}{
		{"embedded", nil, 5 * time.Second, nil},
		{"one endpoint", three[:1], 5 * time.Second, nil},
		{"TTL 5 s", three, 5 * time.Second, []string{"etcd member freezes", "--ttl 14s"}},
		{"TTL 9 s", three, 9 * time.Second, []string{"etcd leader freezes", "up to 7.5s", "past the 6s", "--ttl 14s"}},
		{"TTL 14 s", three, 14 * time.Second, nil},
		{"default", three, etcdstore.DefaultTTL, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := DefaultConfig()
			cfg.Endpoints, cfg.TTL = tt.endpoints, tt.ttl
			got := ttlWarning(&cfg)
			if (got != "") != (tt.want != nil) {
				t.Fatalf("warning %q, want one: %v", got, tt.want != nil)
			}
			for _, w := range tt.want {
				if !strings.Contains(got, w) {
					t.Errorf("warning %q does not say %q", got, w)
				}
			}
		})
	}
}

// TestNodeWarnsShortTTLOnce: New logs the warning once, at start, and
// still starts.
func TestNodeWarnsShortTTLOnce(t *testing.T) {
	srv := etcdtest.Start(t)
	root := t.TempDir() // the prefix's shared root
	for _, tt := range []struct {
		name      string
		endpoints []string
		ttl       time.Duration
		warnings  int
	}{
		{"two endpoints, TTL 5 s", []string{srv.Endpoint, srv.Endpoint}, 5 * time.Second, 1},
		{"two endpoints, default TTL", []string{srv.Endpoint, srv.Endpoint}, etcdstore.DefaultTTL, 0},
		{"one endpoint, TTL 5 s", []string{srv.Endpoint}, 5 * time.Second, 0},
	} {
		t.Run(tt.name, func(t *testing.T) {
			cfg := DefaultConfig()
			cfg.Endpoints, cfg.TTL = tt.endpoints, tt.ttl
			cfg.Root, cfg.StateDir = root, t.TempDir()
			cfg.GCInterval = 0
			var logs bytes.Buffer
			n, err := New(context.Background(), cfg, slog.New(slog.NewTextHandler(&logs, nil)))
			if err != nil {
				t.Fatalf("New: %v", err)
			}
			n.Close()
			if got := strings.Count(logs.String(), "too short to ride out a frozen etcd member"); got != tt.warnings {
				t.Errorf("%d warnings, want %d; log:\n%s", got, tt.warnings, logs.String())
			}
			if tt.warnings > 0 {
				t.Logf("log: %s", logs.String())
			}
		})
	}
}
