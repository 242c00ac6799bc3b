//go:build e2e

package e2e

import (
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestBuildOnce: 3 workers × 10 concurrent builds of one ID run the builder
// exactly once (each run leaves one marker file on the shared volume), and
// every call succeeds.
func TestBuildOnce(t *testing.T) {
	c := newCluster(t, clusterOpts{})
	buildOnce(t, c, "once", 10)
}

func buildOnce(t *testing.T, c *cluster, id string, perWorker int) {
	// One marker file per run: appends to one file from several NFS clients
	// are not atomic.
	builder := `mkdir -p /shared/e2e/` + id + `.builds && touch "/shared/e2e/` + id + `.builds/$GRANARY_HOST.$$" && sleep 2 && echo ok > "$GRANARY_OUT/ok"`
	var wg sync.WaitGroup
	results := make(chan string, 3*perWorker)
	for _, w := range []string{"worker1", "worker2", "worker3"} {
		for range perWorker {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if r := c.granary(w, "build", id, "--", "sh", "-c", builder); r.code != 0 {
					results <- fmt.Sprintf("%s: %s", w, r)
				}
			}()
		}
	}
	wg.Wait()
	close(results)
	for r := range results {
		t.Errorf("build failed: %s", r)
	}
	builds := c.sh("worker1", "ls /shared/e2e/"+id+".builds")
	if n := len(strings.Fields(builds.out)); builds.code != 0 || n != 1 {
		t.Fatalf("builder ran %d times, want 1: %s", n, builds)
	}
	c.must("worker2", "verify", id)
	if r := c.granary("worker3", "run", id, "--", "sh", "-c", `cat "$GRANARY_PKG/ok"`); r.code != 0 || strings.TrimSpace(r.out) != "ok" {
		t.Fatalf("run: %s", r)
	}
	// granary-run, the light launcher, does the job through worker3's node
	// itself (its command's parent is granary-run, not the full binary).
	if r := c.sh("worker3", "granary-run "+id+` -- sh -c 'cat "$GRANARY_PKG/ok"; cat /proc/$PPID/comm'`); r.code != 0 || strings.Join(strings.Fields(r.out), " ") != "ok granary-run" {
		t.Fatalf("granary-run: %s", r)
	}
	t.Logf("%d concurrent builds of %s: builder ran once (%s)", 3*perWorker, id, strings.TrimSpace(builds.out))
}

// TestHolderCrash: a reference held by a killed worker blocks removal until
// its lease expires, then no longer.
func TestHolderCrash(t *testing.T) {
	// A 15 s TTL: the first rm after the kill must come before the
	// reference expires, even on a busy machine.
	c := newCluster(t, clusterOpts{env: []string{"GRANARY_TTL=15"}})
	c.must("worker1", "build", "held", "--", "sh", "-c", `echo x > "$GRANARY_OUT/x"`)
	holder := c.background("worker2", "run", "held", "--", "sleep", "1000")
	c.waitRefs("held", "worker2")
	if r := c.granary("worker1", "rm", "held"); r.code == 0 || !strings.Contains(r.out, "worker2") {
		t.Fatalf("rm while worker2 holds a reference: %s; want refused naming worker2", r)
	}

	c.dockerDo("kill", "worker2")
	killed := time.Now()
	if r := c.wait(holder, time.Minute, "run on the killed worker"); r.code == 0 {
		t.Errorf("run on the killed worker exited 0: %s", r)
	}
	refused := 0
	c.eventually(takeover, "rm after the holder's lease expired", func() (bool, string) {
		r := c.granary("worker1", "rm", "held")
		if r.code != 0 {
			refused++
		}
		return r.code == 0, r.String()
	})
	if refused == 0 {
		t.Errorf("rm succeeded at once after the kill; the reference should outlive the holder by up to the TTL")
	}
	t.Logf("rm refused %d times, then succeeded %v after the kill (TTL 15s)", refused, time.Since(killed).Round(100*time.Millisecond))
	if _, r := c.inspect("worker3", "held"); r.code != 3 {
		t.Fatalf("inspect after rm: %s; want exit 3 (does not exist)", r)
	}
}

// TestBuilderCrash: a worker killed mid-build; a build waiting on another
// worker takes over and completes, and the dead attempt's partial tree is
// never published.
func TestBuilderCrash(t *testing.T) {
	c := newCluster(t, clusterOpts{})
	dying := c.background("worker1", "build", "crash", "--", "sh", "-c",
		`echo partial > "$GRANARY_OUT/partial"; mkdir -p /shared/e2e; touch /shared/e2e/crash.started; sleep 1000`)
	c.eventually(takeover, "the first builder to start", func() (bool, string) {
		r := c.sh("worker2", "test -e /shared/e2e/crash.started")
		return r.code == 0, r.String()
	})
	// The waiter's progress goes to a file too, so the test knows it is
	// waiting on worker1's attempt before it kills worker1.
	waiter := c.backgroundExec("worker2", "sh", "-c",
		`set -o pipefail; granary build crash -- sh -c 'echo good > "$GRANARY_OUT/good"' 2>&1 | tee /tmp/waiter.log`)
	c.eventually(takeover, "worker2 waiting on worker1's attempt", func() (bool, string) {
		r := c.sh("worker2", "cat /tmp/waiter.log")
		return strings.Contains(r.out, "waiting for crash: building on worker1"), r.String()
	})
	c.dockerDo("kill", "worker1")
	<-dying

	r := c.wait(waiter, takeover, "the waiting build")
	if r.code != 0 {
		t.Fatalf("waiting build after the builder's crash: %s", r)
	}
	t.Logf("waiting build: %s", r)
	ls := c.sh("worker3", "ls /shared/root/pkgs/crash/contents")
	if ls.code != 0 || strings.Join(strings.Fields(ls.out), " ") != "good" {
		t.Fatalf("published tree: %s; want only the takeover's file", ls)
	}
	info, _ := c.inspect("worker3", "crash")
	if info.Package == nil || info.Package.BuiltBy != "worker2" {
		t.Fatalf("published by %+v, want worker2", info.Package)
	}
	c.must("worker3", "verify", "crash")
}

// TestFrozenBuilder: a builder frozen (docker pause) past its TTL loses the
// build to another worker; once thawed it is cancelled, does not publish,
// and the published package verifies.
func TestFrozenBuilder(t *testing.T) {
	c := newCluster(t, clusterOpts{})
	frozen := c.background("worker1", "build", "zombie", "--", "sh", "-c",
		`mkdir -p /shared/e2e; touch /shared/e2e/zombie.started; sleep 1000; echo zombie > "$GRANARY_OUT/zombie"`)
	c.eventually(takeover, "the first builder to start", func() (bool, string) {
		r := c.sh("worker2", "test -e /shared/e2e/zombie.started")
		return r.code == 0, r.String()
	})
	c.dockerDo("pause", "worker1")
	paused := time.Now()

	r := c.granary("worker2", "build", "zombie", "--", "sh", "-c", `echo good > "$GRANARY_OUT/good"`)
	if r.code != 0 {
		t.Fatalf("takeover build while worker1 is frozen: %s", r)
	}
	t.Logf("worker2 built after %v of freeze: %s", time.Since(paused).Round(100*time.Millisecond), strings.TrimSpace(r.out))
	c.dockerDo("unpause", "worker1")

	z := c.wait(frozen, takeover, "the thawed builder")
	if z.code == 0 {
		t.Fatalf("the thawed builder's build succeeded: %s", z)
	}
	if !strings.Contains(z.out, "lease") {
		t.Errorf("the thawed builder's error does not mention its lost lease: %s", z)
	}
	t.Logf("thawed builder: %s", z)
	info, _ := c.inspect("worker3", "zombie")
	if info.Package == nil || info.Package.BuiltBy != "worker2" {
		t.Fatalf("published by %+v, want worker2", info.Package)
	}
	ls := c.sh("worker3", "ls /shared/root/pkgs/zombie/contents")
	if strings.TrimSpace(ls.out) != "good" {
		t.Fatalf("published tree: %s; want only the takeover's file", ls)
	}
	c.must("worker1", "verify", "zombie")
	c.waitHealthy("worker1") // the thawed node made a new lease
}

// TestPartition: a worker cut off the network loses its references
// cluster-wide; on reconnect it reports the lease loss, a `run` whose
// package was removed meanwhile stops its command, and one whose package is
// still there takes its reference again.
func TestPartition(t *testing.T) {
	c := newCluster(t, clusterOpts{})
	for _, id := range []string{"gone", "kept"} {
		c.must("worker1", "build", id, "--", "sh", "-c", `echo x > "$GRANARY_OUT/x"`)
	}
	goneRun := c.background("worker3", "run", "gone", "--", "sleep", "1001")
	keptRun := c.background("worker3", "run", "kept", "--", "sleep", "1002")
	for _, id := range []string{"gone", "kept"} {
		c.waitRefs(id, "worker3")
	}

	c.dockerDo("network", "worker3", "disconnect", c.network())
	cut := time.Now()
	for _, id := range []string{"gone", "kept"} {
		c.waitRefs(id)
	}
	t.Logf("references expired %v after the cut (TTL %v)", time.Since(cut).Round(100*time.Millisecond), ttl)
	c.must("worker1", "rm", "gone")
	c.dockerDo("network", "worker3", "connect", c.network())

	r := c.wait(goneRun, takeover, "run of the removed package")
	if r.code == 0 || !strings.Contains(r.out, "gone") {
		t.Fatalf("run whose package was removed during the partition: %s; want it stopped with the reason", r)
	}
	t.Logf("run of the removed package: %s", r)
	c.waitRefs("kept", "worker3")
	select {
	case r := <-keptRun:
		t.Fatalf("run of the kept package ended: %s", r)
	default:
	}
	if c.killMatching("worker3", "sleep 1002") != 1 {
		t.Fatalf("the command of run kept is not running")
	}
	c.wait(keptRun, takeover, "run of the kept package after its command was killed")
	logs, _ := c.compose(t.Context(), "logs", "--no-color", "worker3")
	if !strings.Contains(logs, "lease lost") {
		t.Errorf("worker3's node did not report the lease loss:\n%s", logs)
	}
	c.waitHealthy("worker3")
}

// TestEtcdMemberLoss: with one member down everything goes on; with two
// down, operations fail with clear errors within their deadlines and
// nothing is published or removed; once they are back, everything resumes.
func TestEtcdMemberLoss(t *testing.T) {
	c := newCluster(t, clusterOpts{})
	c.must("worker1", "build", "before", "--", "sh", "-c", `echo x > "$GRANARY_OUT/x"`)

	c.dockerDo("stop", "etcd3")
	c.must("worker1", "build", "one-down", "--", "sh", "-c", `echo x > "$GRANARY_OUT/x"`)
	c.must("worker2", "run", "one-down", "--", "true")
	c.must("worker3", "verify", "before")

	c.dockerDo("stop", "etcd2")
	start := time.Now()
	marker := `mkdir -p /shared/e2e; touch /shared/e2e/no-quorum.ran; echo x > "$GRANARY_OUT/x"`
	r := c.granary("worker1", "build", "no-quorum", "--", "sh", "-c", marker)
	if r.code <= 0 {
		t.Fatalf("build without an etcd quorum: %s; want a failure within the deadline", r)
	}
	t.Logf("build without quorum failed after %v: %s", time.Since(start).Round(100*time.Millisecond), r)
	if !strings.Contains(r.out, "etcd") {
		t.Errorf("the error does not say etcd is the problem: %s", r)
	}
	if rm := c.granary("worker2", "rm", "before"); rm.code <= 0 || !strings.Contains(rm.out, "etcd") {
		t.Fatalf("rm without quorum: %s; want a failure naming etcd within the deadline", rm)
	} else {
		t.Logf("rm without quorum: %s", rm)
	}
	if ran := c.sh("worker1", "test -e /shared/e2e/no-quorum.ran"); ran.code == 0 {
		t.Errorf("the builder ran without the build lock")
	}
	if ls := c.sh("worker1", "test -e /shared/root/pkgs/before/contents/x"); ls.code != 0 {
		t.Fatalf("package removed without quorum: %s", ls)
	}

	c.dockerDo("start", "etcd2")
	c.dockerDo("start", "etcd3")
	c.waitHealthy("etcd2")
	c.waitHealthy("etcd3")
	c.eventually(takeover, "a build after the members came back", func() (bool, string) {
		r := c.granary("worker1", "build", "no-quorum", "--", "sh", "-c", `echo x > "$GRANARY_OUT/x"`)
		return r.code == 0, r.String()
	})
	for _, id := range []string{"before", "one-down", "no-quorum"} {
		c.must("worker3", "verify", id)
	}
	c.must("worker2", "rm", "before")
	for _, w := range []string{"worker1", "worker2", "worker3"} {
		c.waitHealthy(w)
	}
}

// TestGCUnderLoad: a node's GC loop sweeps every second while jobs hold
// and churn references: nothing referenced is removed, the unreferenced
// packages are.
func TestGCUnderLoad(t *testing.T) {
	c := newCluster(t, clusterOpts{})
	held := []string{"held-a", "held-b"}
	free := []string{"free-a", "free-b", "free-c"}
	for _, id := range append(slices.Clone(held), free...) {
		c.must("worker1", "build", id, "--", "sh", "-c", `echo x > "$GRANARY_OUT/x"`)
	}
	holdA := c.background("worker2", "run", "held-a", "--", "sleep", "1003")
	holdB := c.background("worker3", "run", "held-b", "--", "sleep", "1003")
	for _, id := range held {
		c.eventually(takeover, "reference to "+id, func() (bool, string) {
			hosts := c.refHosts("worker1", id)
			return len(hosts) == 1, fmt.Sprint(hosts)
		})
	}
	// Load: reference churn on a held package and builds of new ones.
	c.sh("worker1", `(while true; do granary run held-a -- true; granary build "load-$RANDOM" -- true; done) >/dev/null 2>&1 &`)

	gc := c.background("worker3", "serve", "--host", "gc3", "--state-dir", "/tmp/gc3", "--listen-metrics", "",
		"--gc-interval", "1s", "--gc-older-than", "1s", "--gc-grace", "-1ns", "--gc-max", "0")
	for _, id := range free {
		c.eventually(takeover, id+" collected", func() (bool, string) {
			_, r := c.inspect("worker1", id)
			return r.code == 3, r.String()
		})
	}
	for range 3 { // a few more sweeps with the held ones in reach
		time.Sleep(time.Second)
		for _, id := range held {
			c.must("worker2", "verify", id)
		}
	}
	c.killMatching("worker3", "granary serve --host gc3")
	c.killMatching("worker1", "sh -c (while true;")
	if r := c.wait(gc, takeover, "the GC node"); r.code != 0 {
		t.Logf("GC node: %s", r)
	}
	c.killMatching("worker2", "sleep 1003")
	c.killMatching("worker3", "sleep 1003")
	for _, ch := range []<-chan result{holdA, holdB} {
		c.wait(ch, takeover, "a holder after its command was killed")
	}
}
