package node_test

import (
	"testing"

	"github.com/granary-build/granary/internal/etcdtest"
	"github.com/granary-build/granary/node"
)

// TestAgentLayoutMatchesStore: the light agent client repeats the shared
// root's layout (it imports neither etcdstore nor internal/paths); its
// handles must name the directories the store's do.
func TestAgentLayoutMatchesStore(t *testing.T) {
	srv := etcdtest.Start(t)
	nd, _ := agentNode(t, srv, t.TempDir(), "host-a", node.DefaultLinger)
	c := connect(t, nd)
	for _, id := range []string{"pkg", "a.b-c_d+e=f@g"} {
		got, want := c.Get(id), nd.Store().Get(id)
		if got.OutputDirectory() != want.OutputDirectory() || got.LoggingDirectory() != want.LoggingDirectory() {
			t.Errorf("%s: agent says %s and %s, the store %s and %s", id,
				got.OutputDirectory(), got.LoggingDirectory(), want.OutputDirectory(), want.LoggingDirectory())
		}
	}
}
