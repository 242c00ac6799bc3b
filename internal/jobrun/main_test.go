package jobrun

import (
	"fmt"
	"os"
	"runtime"
	"strings"
	"testing"
	"time"
)

// TestMain fails the run if goroutines outlive the tests. It is etcd's
// testutil check, except that the signal loop, which the first
// signal.Notify starts for the life of the process, is expected.
func TestMain(m *testing.M) {
	code := m.Run()
	if code == 0 {
		var left []string
		for range 50 { // up to a second for goroutines that are exiting
			if left = leftover(); len(left) == 0 {
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
		if len(left) > 0 {
			fmt.Fprintf(os.Stderr, "goroutines left after the tests:\n\n%s\n", strings.Join(left, "\n\n"))
			code = 1
		}
	}
	os.Exit(code)
}

func leftover() []string {
	buf := make([]byte, 1<<20)
	buf = buf[:runtime.Stack(buf, true)]
	var out []string
	for _, g := range strings.Split(string(buf), "\n\n") {
		if strings.Contains(g, "testing.(*M).Run") || strings.Contains(g, "os/signal.loop") ||
			strings.Contains(g, "runtime.goexit") && strings.Contains(g, "created by runtime") || strings.Contains(g, "testing.runFuzzing") {
			continue
		}
		if strings.Contains(g, "jobrun.TestMain") || strings.Contains(g, "leftover") {
			continue
		}
		out = append(out, g)
	}
	return out
}
