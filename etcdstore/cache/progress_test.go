package cache_test

import (
	"context"
	"errors"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/granary-build/granary/etcdstore/cache"
)

// TestSlowFetchReportsProgressAndSpendsItsBudget: a server that sends the
// index at once and then the archive's first bytes, and no more, while
// keeping the connection open. The per-request deadline is an hour, so
// only the fetch budget ends the Fetch; meanwhile the progress hook sees
// the bytes that came and the archive's size from the index.
func TestSlowFetchReportsProgressAndSpendsItsBudget(t *testing.T) {
	base := t.TempDir()
	dirCache, err := cache.NewDir(base)
	if err != nil {
		t.Fatal(err)
	}
	src, rec := published(t)
	if err := dirCache.Store(context.Background(), "pkg", src, rec); err != nil {
		t.Fatal(err)
	}
	index, err := os.ReadFile(filepath.Join(base, "pkg.json"))
	if err != nil {
		t.Fatal(err)
	}
	archive, err := os.ReadFile(filepath.Join(base, "pkg.tar.zst"))
	if err != nil {
		t.Fatal(err)
	}
	const sent = 100
	done := make(chan struct{})
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case strings.HasSuffix(r.URL.Path, "/pkg.json"):
			w.Write(index) //nolint:errcheck // the client reads it or fails
		case strings.HasSuffix(r.URL.Path, "/pkg.tar.zst"):
			w.Header().Set("Content-Length", strconv.Itoa(len(archive)))
			w.Write(archive[:sent]) //nolint:errcheck
			w.(http.Flusher).Flush()
			select { // then nothing, until the client or the test gives up
			case <-r.Context().Done():
			case <-done:
			}
		default:
			http.NotFound(w, r)
		}
	})}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Go(func() { srv.Serve(ln) }) //nolint:errcheck // ends with Close
	t.Cleanup(func() {
		close(done)
		srv.Close()
		wg.Wait()
	})

	var mu sync.Mutex
	var reports []cache.Progress
	r := openHTTP(t, "http://"+ln.Addr().String()+"/c/", cache.WithTimeout(time.Hour),
		cache.WithFetchBudget(2500*time.Millisecond), cache.WithProgress(func(p cache.Progress) {
			mu.Lock()
			reports = append(reports, p)
			mu.Unlock()
		}))
	ok, err := r.Fetch(context.Background(), "pkg", t.TempDir())
	if ok || !errors.Is(err, cache.ErrFetchBudget) {
		t.Fatalf("Fetch = %v, %v; want ErrFetchBudget", ok, err)
	}
	t.Logf("Fetch: %v", err)
	mu.Lock()
	defer mu.Unlock()
	if len(reports) == 0 {
		t.Fatal("no progress reported during a fetch that took longer than a second")
	}
	last := reports[len(reports)-1]
	if last.ID != "pkg" || last.Bytes != sent || last.Total != int64(len(archive)) || !last.Done {
		t.Errorf("last progress %+v; want pkg, %d bytes of %d, done", last, sent, len(archive))
	}
	for _, p := range reports[:len(reports)-1] {
		if p.Done {
			t.Errorf("progress %+v before the last says done", p)
		}
	}
	if st := r.Stats(); st.BudgetSpent != 1 || st.FetchErrors != 1 {
		t.Errorf("Stats = %+v; want one fetch error that spent its budget", st)
	}
}
