set terminal pngcairo size 1100,600 font 'DejaVu Sans,11'
set output '/work/main/bench/results/20261129T110209/times.png'
set title "Time per change set, 4 GiB disk (log scale; lower is better)"
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.85 border -1
set logscale y
set yrange [0.05:*]
set ylabel 'wall time to a durable copy (s)'
set grid ytics
set key outside right top
set datafile missing 'NaN'
plot '/work/main/bench/results/20261129T110209/times.dat' using 2:xtic(1) title columnheader(2), '/work/main/bench/results/20261129T110209/times.dat' using 3:xtic(1) title columnheader(3), '/work/main/bench/results/20261129T110209/times.dat' using 4:xtic(1) title columnheader(4), '/work/main/bench/results/20261129T110209/times.dat' using 5:xtic(1) title columnheader(5), '/work/main/bench/results/20261129T110209/times.dat' using 6:xtic(1) title columnheader(6), '/work/main/bench/results/20261129T110209/times.dat' using 7:xtic(1) title columnheader(7)
