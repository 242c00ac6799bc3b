//go:build e2e

package e2e

import (
	"context"
	"strings"
	"testing"
)

// TestCacheRestoresWipedCluster: with a directory cache on its own volume,
// wiping the shared root and every etcd member's data loses nothing: the
// package comes back from the cache, with the same digest, and the builder
// does not run.
func TestCacheRestoresWipedCluster(t *testing.T) {
	c := newCluster(t, clusterOpts{env: []string{"GRANARY_CACHE=file:///cache"}})
	c.must("worker1", "build", "warm", "--", "sh", "-c",
		`mkdir "$GRANARY_OUT/bin" && echo tool > "$GRANARY_OUT/bin/tool" && chmod +x "$GRANARY_OUT/bin/tool" && ln -s bin/tool "$GRANARY_OUT/link"`)
	before, _ := c.inspect("worker2", "warm")
	if before.Package == nil {
		t.Fatal("warm is not published")
	}
	// `granary build` waits for its upload before it exits.
	if r := c.sh("worker3", "test -s /cache/warm.json && test -s /cache/warm.tar.zst"); r.code != 0 {
		t.Fatalf("no archive in the cache after the build: %s", c.sh("worker3", "ls -l /cache"))
	}

	// Wipe: every container, the shared root and etcd's data; the cache
	// volume stays.
	if out, err := c.compose(context.Background(), "rm", "-s", "-f", "-v"); err != nil {
		t.Fatalf("compose rm: %v\n%s", err, out)
	}
	vols := []string{"volume", "rm"}
	for _, v := range []string{"shared", "etcd1", "etcd2", "etcd3"} {
		vols = append(vols, c.project+"_"+v)
	}
	if out, err := c.docker(context.Background(), vols...); err != nil {
		t.Fatalf("docker volume rm: %v\n%s", err, out)
	}
	c.forget()
	c.up()
	if _, r := c.inspect("worker1", "warm"); r.code != 3 {
		t.Fatalf("after the wipe, inspect warm: %s; want exit 3 (does not exist)", r)
	}

	r := c.granary("worker2", "build", "warm", "--", "sh", "-c", "echo the builder ran; exit 42")
	if r.code != 0 || strings.Contains(r.out, "the builder ran") {
		t.Fatalf("build after the wipe: %s; want the package from the cache", r)
	}
	t.Logf("build after the wipe: %s", r)
	after, _ := c.inspect("worker3", "warm")
	if after.Package == nil || !after.Package.FromCache || after.Package.Digest != before.Package.Digest {
		t.Fatalf("after the wipe: %+v; want from the cache with digest %s", after.Package, before.Package.Digest)
	}
	c.must("worker1", "verify", "warm")
	if r := c.sh("worker3", `cat /shared/root/pkgs/warm/contents/link && test -x /shared/root/pkgs/warm/contents/bin/tool`); r.code != 0 || strings.TrimSpace(r.out) != "tool" {
		t.Fatalf("restored tree: %s; want the link and the executable file", r)
	}
}
