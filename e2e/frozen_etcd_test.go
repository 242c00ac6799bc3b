//go:build e2e

package e2e

import (
	"fmt"
	"strings"
	"testing"
	"time"
)

// TestFrozenEtcdLeader: the etcd leader frozen (docker pause) for 2 × TTL,
// quorum intact. The followers elect a new leader; the workers' clients
// find the frozen member within TTL/5 and move their calls and lease
// keep-alives to the others: no lease is lost, a build spanning the freeze
// publishes, builds and runs during the freeze succeed, a `run`'s
// reference stays, and every daemon's log says it moved off the member and
// nothing about a lost lease.
func TestFrozenEtcdLeader(t *testing.T) { frozenEtcdMember(t, true) }

// TestFrozenEtcdFollower is TestFrozenEtcdLeader with a follower frozen.
func TestFrozenEtcdFollower(t *testing.T) { frozenEtcdMember(t, false) }

func frozenEtcdMember(t *testing.T, leader bool) {
	// The compose default TTL: the guard gives up on a lease after 10 s
	// without an acknowledgement; the freeze lasts 30 s.
	const frozenTTL = 15 * time.Second
	c := newCluster(t, clusterOpts{env: []string{fmt.Sprintf("GRANARY_TTL=%d", int(frozenTTL.Seconds()))}})
	workers := []string{"worker1", "worker2", "worker3"}

	c.must("worker1", "build", "base", "--", "sh", "-c", `echo x > "$GRANARY_OUT/x"`)
	holder := c.background("worker2", "run", "base", "--", "sleep", "1005")
	c.waitRefs("base", "worker2")
	spanning := c.background("worker3", "build", "spanning", "--", "sh", "-c",
		fmt.Sprintf(`mkdir -p /shared/e2e; touch /shared/e2e/spanning.started; sleep %d; echo x > "$GRANARY_OUT/x"`, int((2*frozenTTL+5*time.Second).Seconds())))
	c.eventually(takeover, "the spanning build to start", func() (bool, string) {
		r := c.sh("worker1", "test -e /shared/e2e/spanning.started")
		return r.code == 0, r.String()
	})

	member := c.etcdMember(leader)
	role := map[bool]string{true: "leader", false: "follower"}[leader]
	c.dockerDo("pause", member)
	paused := time.Now()
	builds, failures := 0, 0
	for i := 0; time.Since(paused) < 2*frozenTTL; i++ {
		w := workers[i%len(workers)]
		id := fmt.Sprintf("during-%d", i)
		builds++
		if r := c.granary(w, "build", id, "--", "sh", "-c", `echo x > "$GRANARY_OUT/x"`); r.code != 0 {
			failures++
			t.Errorf("%s: build %s with the %s frozen (%v in): %s", w, id, role, time.Since(paused).Round(100*time.Millisecond), r)
			continue
		}
		if r := c.granary(workers[(i+1)%len(workers)], "run", id, "--", "true"); r.code != 0 {
			failures++
			t.Errorf("run %s with the %s frozen: %s", id, role, r)
		}
	}
	// What the clients must do is done: nothing was lost while frozen.
	frozenLogs := map[string]string{}
	for _, w := range workers {
		frozenLogs[w], _ = c.compose(t.Context(), "logs", "--no-color", w)
	}
	c.dockerDo("unpause", member)
	t.Logf("%s %s frozen for %v: %d builds and runs, %d failed", role, member, time.Since(paused).Round(100*time.Millisecond), builds, failures)

	spanned := c.wait(spanning, takeover+2*frozenTTL, "the build spanning the freeze")
	// A thawed old leader may revoke the leases it saw expire while frozen
	// (etcd-io/etcd#15247's check is skipped right after a thaw; see
	// docs/design.md, "A frozen etcd member"). etcd logs "Ignore the lease
	// revoking request" when it does the right thing; without that line,
	// losses after the thaw are the server's, not the clients'. The line
	// comes at the member's first expiry check after the thaw (every
	// 500 ms): wait for it, and take its absence after ten checks as the
	// race.
	raced := leader && !c.logShows(member, "Ignore the lease revoking request", 5*time.Second)
	if raced {
		t.Logf("the thawed old leader %s revoked the leases it saw expire (etcd server race): losses after the thaw are not checked; build spanning the freeze: %s", member, spanned)
	} else if spanned.code != 0 {
		t.Errorf("the build spanning the freeze: %s", spanned)
	}
	select {
	case r := <-holder:
		t.Fatalf("the run holding base ended during the freeze: %s", r)
	default:
	}
	if raced {
		// worker2's lease went with the server's race; its node takes its
		// reference again on a new lease.
		c.waitRefs("base", "worker2")
	} else if hosts := c.refHosts("worker1", "base"); len(hosts) != 1 || hosts[0] != "worker2" {
		t.Errorf("references to base after the freeze: %v, want [worker2]", hosts)
	}
	if c.killMatching("worker2", "sleep 1005") != 1 {
		t.Fatalf("the command of the run holding base is not running")
	}
	// run exits with its command's status: 143 for the SIGTERM above.
	if r := c.wait(holder, takeover, "the run holding base"); r.code != 143 || (strings.Contains(r.out, "lease") && !raced) {
		t.Errorf("the run holding base: %s; want the killed command's exit 143 and no word of a lease", r)
	}

	// Every daemon moved off the frozen member and lost nothing.
	for _, w := range workers {
		logs, _ := c.compose(t.Context(), "logs", "--no-color", w)
		if raced {
			logs = frozenLogs[w] // up to the thaw
		}
		for _, bad := range []string{"lease lost", "cannot register node", "cancelling builds"} {
			if strings.Contains(logs, bad) {
				t.Errorf("%s's node log says %q:\n%s", w, bad, logs)
			}
		}
		if !strings.Contains(logs, "etcd member not answering") || !strings.Contains(logs, "member=http://"+member+":2379") {
			t.Errorf("%s's node log does not say it moved off %s:\n%s", w, member, logs)
		} else {
			for _, line := range strings.Split(logs, "\n") {
				if strings.Contains(line, "etcd member") || strings.Contains(line, "keep-alive") {
					t.Logf("%s (%s after the pause)", strings.TrimSpace(line), sinceIn(line, paused))
				}
			}
		}
	}
	for _, w := range workers {
		c.waitHealthy(w)
	}
}

// etcdMember returns the etcd service that is the leader, or a follower,
// by each member's etcd_server_is_leader metric.
func (c *cluster) etcdMember(leader bool) string {
	c.t.Helper()
	var lead string
	var followers []string
	c.eventually(takeover, "an etcd leader", func() (bool, string) {
		lead, followers = "", nil
		var all []string
		for _, m := range []string{"etcd1", "etcd2", "etcd3"} {
			r := c.sh(m, "wget -q -O - http://127.0.0.1:2381/metrics | grep '^etcd_server_is_leader '")
			all = append(all, m+": "+strings.TrimSpace(r.out))
			if strings.HasSuffix(strings.TrimSpace(r.out), " 1") {
				lead = m
			} else {
				followers = append(followers, m)
			}
		}
		return lead != "" && len(followers) == 2, strings.Join(all, "; ")
	})
	if leader {
		return lead
	}
	return followers[0]
}

// sinceIn is the time from t0 to the time stamp of a daemon's log line as
// compose prints it ("worker1_1  | time=2026-…Z level=…").
func sinceIn(line string, t0 time.Time) string {
	_, rest, ok := strings.Cut(line, "time=")
	if !ok {
		return "?"
	}
	ts, _, _ := strings.Cut(rest, " ")
	at, err := time.Parse(time.RFC3339Nano, ts)
	if err != nil {
		return "?"
	}
	return at.Sub(t0).Round(10 * time.Millisecond).String()
}

// logShows reports whether service's log contains line within ceiling,
// reading the log again every 250 ms until it does.
func (c *cluster) logShows(service, line string, ceiling time.Duration) bool {
	tick := time.NewTicker(250 * time.Millisecond)
	defer tick.Stop()
	deadline := time.After(ceiling)
	for {
		if out, _ := c.compose(c.t.Context(), "logs", "--no-color", service); strings.Contains(out, line) {
			return true
		}
		select {
		case <-deadline:
			return false
		case <-tick.C:
		}
	}
}
