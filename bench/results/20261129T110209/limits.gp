set terminal pngcairo size 1100,600 font 'DejaVu Sans,11'
set output '/work/main/bench/results/20261129T110209/limits.png'
set title "Ferry's throughput (changed bytes / wall; full: allocated bytes / wall) against this machine's limits"
set style fill solid 0.85 border -1
set boxwidth 0.7
set logscale y
set yrange [10:40000]
set ylabel 'MB/s (log scale)'
set grid ytics
set xtics rotate by -30
set key off
set palette defined (1 '#1f77b4', 2 '#aaaaaa')
unset colorbox
plot '/work/main/bench/results/20261129T110209/limits.dat' using 1:3:4:xtic(2) with boxes lc palette, '' using 1:3:(sprintf('%.0f', $3)) with labels offset 0,0.8
